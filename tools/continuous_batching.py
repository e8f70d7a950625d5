"""Window batching against continuous admission (new requests start between decode steps), in-process.

The standard merged decoder takes one past length for the whole batch and derives positions from
it, and has no self-attention mask: a request cannot join a running batch's decode exactly. What
the standard graphs allow is step-level scheduling of cohorts: a new cohort (its encoder pass and
its own KV cache) starts between steps of the running ones, and cohorts take turns stepping.
Both policies below use the same stepping code, with per-row forced lengths, on cached image
features (the decode-bound case, where continuous batching could matter), closed loop, C clients:
even clients ask for SHORT tokens, odd ones for LONG.
"""

import json
import sys
import time
from collections import deque

import numpy as np

from flonnx.runtime import Florence2, Request, synthetic
from flonnx.runtime.decoding import CachedDecoder

folder, variant = sys.argv[1], sys.argv[2]
SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else 60
CLIENTS, MAX_ROWS, SHORT, LONG = 8, 8, 16, 96
model = Florence2.load(folder, variant=variant, threads=2)
features = model.encode_images([synthetic.make_scene(3, 0).image])[0]
EOS, START = 2, 2


class Cohort:
    def __init__(self, items):
        requests = [Request(features, "<OD>") for _ in items]
        embeds, mask = model._encoder_inputs(requests, [features] * len(items))
        hidden = model._sessions["encoder_model"].run(
            None, {"inputs_embeds": embeds, "attention_mask": mask}
        )[0]
        s = model._sessions
        self.cache = CachedDecoder(s["embed_tokens"], s["decoder_model_merged"], hidden, mask, model.layout)
        self.items = list(items)
        self.seqs = [[START] for _ in items]
        self.active = np.arange(len(items))

    def step(self):
        last = np.array([self.seqs[r][-1] for r in self.active], np.int64)
        logits = self.cache.step(last).copy()
        chosen = []
        for i, r in enumerate(self.active):
            length = self.items[r][2]
            if len(self.seqs[r]) < length:
                logits[i, EOS] = -np.inf
                chosen.append(int(logits[i].argmax()))
            else:
                chosen.append(EOS)
        finished = []
        for r, token in zip(self.active, chosen):
            self.seqs[r].append(token)
        keep = np.array([t != EOS for t in chosen])
        finished = [self.items[r] for r, k in zip(self.active, keep) if not k]
        if not keep.all():
            self.active = self.active[keep]
            if len(self.active):
                self.cache.select(np.flatnonzero(keep))
        return finished


def run(policy):
    waiting = deque((c, time.perf_counter(), SHORT if c % 2 == 0 else LONG) for c in range(CLIENTS))
    done = {"short": [], "long": []}
    started = time.perf_counter()
    end = started + SECONDS
    warm = started + 10  # the first 10 s are left out

    def complete(item):
        now = time.perf_counter()
        client, submitted, length = item
        if submitted >= warm:
            done["short" if length == SHORT else "long"].append(now - submitted)
        waiting.append((client, now, length))

    cohorts = []
    steps = 0
    while time.perf_counter() < end:
        if policy == "window":
            take = [waiting.popleft() for _ in range(min(MAX_ROWS, len(waiting)))]
            cohort = Cohort(take)
            while len(cohort.active):
                for item in cohort.step():
                    complete(item)
                steps += 1
        else:
            rows = sum(len(c.active) for c in cohorts)
            if waiting and rows < MAX_ROWS:
                cohorts.append(Cohort([waiting.popleft() for _ in range(min(MAX_ROWS - rows, len(waiting)))]))
            for cohort in cohorts:
                for item in cohort.step():
                    complete(item)
                steps += 1
            cohorts = [c for c in cohorts if len(c.active)]
    measured = time.perf_counter() - warm

    def pct(v, q):
        return sorted(v)[min(len(v) - 1, int(q * len(v)))] if v else None

    return {
        "policy": policy,
        "completed_per_s": round((len(done["short"]) + len(done["long"])) / measured, 3),
        "tokens_per_s": round((len(done["short"]) * SHORT + len(done["long"]) * LONG) / measured, 1),
        "short_p50_s": pct(done["short"], 0.5),
        "short_p90_s": pct(done["short"], 0.9),
        "long_p50_s": pct(done["long"], 0.5),
        "long_p90_s": pct(done["long"], 0.9),
        "decoder_runs": steps,
    }


results = []
for policy in ("window", "continuous", "window", "continuous"):
    r = run(policy)
    results.append(r)
    print(json.dumps(r), flush=True)
