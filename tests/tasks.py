"""Every Florence-2 task token, with an input for those that take one: the tables parity tests run."""

REGION = "<loc_100><loc_150><loc_700><loc_900>"
TASKS = [
    ("<CAPTION>", None),
    ("<DETAILED_CAPTION>", None),
    ("<MORE_DETAILED_CAPTION>", None),
    ("<OD>", None),
    ("<DENSE_REGION_CAPTION>", None),
    ("<REGION_PROPOSAL>", None),
    ("<OCR>", None),
    ("<OCR_WITH_REGION>", None),
    ("<CAPTION_TO_PHRASE_GROUNDING>", "a red car next to a tree"),
    ("<REFERRING_EXPRESSION_SEGMENTATION>", "the red car"),
    ("<REGION_TO_SEGMENTATION>", REGION),
    ("<OPEN_VOCABULARY_DETECTION>", "car"),
    ("<REGION_TO_CATEGORY>", REGION),
    ("<REGION_TO_DESCRIPTION>", REGION),
    ("<REGION_TO_OCR>", REGION),
]
