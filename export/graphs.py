"""The torch modules that become the four ONNX graphs, one wrapper per graph.

The vision encoder, embedding and text encoder wrap the checkpoint's own modules. The decoder is
written out against the checkpoint's BART weights so that its key/value cache is plain tensors
in and out (the layout onnx-community and optimum use), with no `transformers` cache object to
trace through. Validation compares every wrapper with `transformers` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, model) -> DecoderShape:
        text = model.config.text_config
        return cls(
            text.decoder_layers, text.decoder_attention_heads, text.d_model // text.decoder_attention_heads
        )


def past_names(n_layers: int, prefix: str = "past_key_values", with_encoder: bool = True) -> list[str]:
    """Cache tensor names in graph order: per layer decoder key, value, then encoder key, value."""
    kinds = ("decoder", "encoder") if with_encoder else ("decoder",)
    return [f"{prefix}.{i}.{kind}.{kv}" for i in range(n_layers) for kind in kinds for kv in ("key", "value")]


class VisionEncoder(nn.Module):
    """pixel_values [B,3,H,W] -> image_features [B,N,D]: DaViT plus the multi-modal projector.

    The checkpoint's modules, but with the hidden state kept channels-last [B,H,W,C] from stage to
    stage. `transformers` moves it to [B,C,H,W] around every depthwise convolution and back for
    every norm, attention and MLP, four transposes per block half; here the only layout change is
    the one each convolution makes itself, which onnxruntime folds into the NCHWc reorders around
    the convolution (`ReorderInput`/`ReorderOutput` with channels_last).

    The first two stages run in bands of rows (`BAND_VALUES`), so that their widest tensors never
    exist whole. The MLP half of a block (norm, fc1, GELU, fc2, residual) is per token: at 768x768
    its hidden tensor in stage 0 is 192x192x512 floats (75 MB per image, its GELU output as large
    beside it). The window attention is per window, and onnxruntime's attention kernel holds the
    scores of every window and head at once (stage 0: 256 windows x 4 heads x 144 x 144 floats,
    85 MB, beside the 3x-wide qkv and its q, k, v): bands of whole window rows. The channel
    attention's 3x-wide qkv and its transposes: scores summed band by band. Base int8, a fresh
    process, two captions, peak RSS in MiB: 715 whole, 635 with MLP bands, 621 with window bands
    too, 584 with the arena growing by what is asked (runtime/sessions.py), 551 with channel
    bands too. Vision time unchanged (0.554 -> 0.545 s and 0.557 -> 0.556 s, medians of 10 runs
    alternating in one process); fp32 output within 4e-6 of the whole graph, int8 as close to
    fp32 as before (cosine 0.99974 both).
    """

    def __init__(self, model):
        super().__init__()
        self.backbone = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = pixel_values.to(self.backbone.convs[0].conv.weight.dtype).permute(0, 2, 3, 1)
        for embed, blocks in zip(self.backbone.convs, self.backbone.blocks):
            if embed.pre_norm:
                hidden = embed.norm(hidden)
            hidden = _conv_channels_last(embed.conv, hidden)
            if not embed.pre_norm:
                hidden = embed.norm(hidden)
            for block in blocks:
                hidden = _channel_block(block.channel_block, _spatial_block(block.spatial_block, hidden))
        return self.projector(hidden.permute(0, 3, 1, 2))


def _conv_channels_last(conv: nn.Conv2d, hidden: torch.Tensor) -> torch.Tensor:
    return conv(hidden.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


# MLP hidden values (tokens x fc1 width) per band: at 768x768, stage 0 (192x192 tokens, 512 wide)
# runs in 4 bands of 48 rows, stage 1 (96x96, 1024) in 2, later stages whole. The channel attention
# takes the same bands, the window attention the same rows rounded down to whole window rows (12).
BAND_VALUES = 48 * 192 * 512


def _band_rows(block, hidden: torch.Tensor) -> int:
    """Rows per band of a block whose [B,H,W,C] hidden state is `hidden` (static in the export)."""
    return max(1, BAND_VALUES // (hidden.shape[2] * block.ffn.fc1.out_features))


def _in_bands(half, hidden: torch.Tensor, rows: int) -> torch.Tensor:
    """`half(hidden)` over bands of `rows` rows: Split -> per band -> Concat in the export."""
    if hidden.shape[1] <= rows:
        return half(hidden)
    return torch.cat([half(band) for band in hidden.split(rows, dim=1)], dim=1)


def _mlp(block, hidden: torch.Tensor) -> torch.Tensor:
    """`hidden + ffn(norm2(hidden))` on [B,H,W,C], per token."""
    return _in_bands(lambda x: x + block.ffn(block.norm2(x)), hidden, _band_rows(block, hidden))


def _window_attention(block, hidden: torch.Tensor) -> torch.Tensor:
    """`hidden + window_attn(norm1(hidden))` on [B,H,W,C], in bands of whole window rows. Windows
    are counted from the top and padded at the bottom, so every band holds the same windows as
    the whole image does, the last one with the same padding."""
    window = block.window_attn.window_size
    rows = max(window, _band_rows(block, hidden) // window * window)
    return _in_bands(lambda x: x + block.window_attn(block.norm1(x)).view(x.shape), hidden, rows)


def _spatial_block(block, hidden: torch.Tensor) -> torch.Tensor:
    """transformers' Florence2VisionSpatialBlock on [B,H,W,C] (drop path is the identity at eval)."""
    hidden = _conv_channels_last(block.conv1, hidden) + hidden
    hidden = _window_attention(block, hidden)
    hidden = _conv_channels_last(block.conv2, hidden) + hidden
    return _mlp(block, hidden)


def _channel_attention(block, hidden: torch.Tensor) -> torch.Tensor:
    """`hidden + channel_attn(norm1(hidden))` on [B,H,W,C]. The attention is over the channels
    of each group, its scores q^T k a sum over every token: in bands, the first pass adds up the
    scores band by band and keeps v, the second applies them to each band's v."""
    attn = block.channel_attn
    rows = _band_rows(block, hidden)
    if hidden.shape[1] <= rows:
        return hidden + attn(block.norm1(hidden).flatten(1, 2)).view(hidden.shape)
    width, dim = hidden.shape[2], hidden.shape[3]
    groups = attn.groups
    scores, values = 0, []
    for band in hidden.split(rows, dim=1):
        qkv = attn.qkv(block.norm1(band))
        qkv = qkv.reshape(qkv.shape[0], band.shape[1] * width, 3, groups, dim // groups)  # [B,n,3,G,d]
        scores = scores + qkv[:, :, 0].permute(0, 2, 3, 1) @ qkv[:, :, 1].permute(0, 2, 1, 3)
        values.append(qkv[:, :, 2].permute(0, 2, 3, 1))  # [B,G,d,n]
    weights = torch.softmax(scores * (hidden.shape[1] * width) ** -0.5, dim=-1)  # [B,G,d,d]
    out = []
    for band, value in zip(hidden.split(rows, dim=1), values):
        mixed = (weights @ value).permute(0, 3, 1, 2).reshape(band.shape)  # [B,n,G,d] -> [B,h,W,C]
        out.append(band + attn.proj(mixed))
    return torch.cat(out, dim=1)


def _channel_block(block, hidden: torch.Tensor) -> torch.Tensor:
    """transformers' Florence2VisionChannelBlock on [B,H,W,C]."""
    hidden = _conv_channels_last(block.conv1, hidden) + hidden
    hidden = _channel_attention(block, hidden)
    hidden = _conv_channels_last(block.conv2, hidden) + hidden
    return _mlp(block, hidden)


class EmbedTokens(nn.Module):
    """input_ids [B,T] -> inputs_embeds [B,T,D], shared by the text encoder and the decoder."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class TextEncoder(nn.Module):
    """inputs_embeds [B,S,D] (image features, then prompt embeddings), attention_mask [B,S]
    -> last_hidden_state [B,S,D]."""

    def __init__(self, model):
        super().__init__()
        self.encoder = model.model.language_model.encoder

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state


def _heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, heads, head_dim).transpose(1, 2)


def _attend(q, k, v, bias, scaling: float, width: int) -> torch.Tensor:
    weights = torch.matmul(q, k.transpose(2, 3)) * scaling + bias
    out = torch.matmul(torch.softmax(weights, dim=-1), v).transpose(1, 2)
    # Batch and length from the tensor reshaped, the width a Python int: the export's shape
    # chain then folds to a constant (see simplify.py).
    return out.reshape(out.shape[0], out.shape[1], width)


class Decoder(nn.Module):
    """One BART decoder pass with an explicit key/value cache.

    `with_past=False` (the first step): takes encoder_hidden_states, computes the cross-attention
    K/V and returns them with the self-attention K/V. `with_past=True` (later steps): takes both
    caches, returns logits and the grown self-attention K/V only.
    """

    def __init__(self, model, with_past: bool):
        super().__init__()
        bart = model.model.language_model.decoder
        self.layers = bart.layers
        self.embed_positions = bart.embed_positions
        self.layernorm_embedding = bart.layernorm_embedding
        self.lm_head = model.lm_head
        self.shape = DecoderShape.of(model)
        self.with_past = with_past
        self.activation = self.layers[0].activation_fn

    def forward(self, inputs_embeds, encoder_attention_mask, *rest):
        h, d = self.shape.heads, self.shape.head_dim
        min_value = torch.finfo(inputs_embeds.dtype).min
        length = inputs_embeds.shape[1]
        if self.with_past:
            past = rest
            past_length = past[0].shape[2]
        else:
            encoder_hidden_states = rest[0]
            past_length = 0
        positions = torch.arange(length, dtype=torch.long) + past_length + self.embed_positions.offset
        hidden = self.layernorm_embedding(inputs_embeds + self.embed_positions.weight[positions])

        total = past_length + length
        query_pos = torch.arange(length).unsqueeze(1) + past_length
        key_pos = torch.arange(total).unsqueeze(0)
        causal = (key_pos > query_pos).to(hidden.dtype) * min_value
        cross_bias = (1.0 - encoder_attention_mask.to(hidden.dtype))[:, None, None, :] * min_value

        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q = _heads(attn.q_proj(hidden), h, d)
            k = _heads(attn.k_proj(hidden), h, d)
            v = _heads(attn.v_proj(hidden), h, d)
            if self.with_past:
                k = torch.cat([past[4 * i], k], dim=2)
                v = torch.cat([past[4 * i + 1], v], dim=2)
            hidden = layer.self_attn_layer_norm(
                hidden + attn.out_proj(_attend(q, k, v, causal, attn.scaling, h * d))
            )
            presents += [k, v]

            cross = layer.encoder_attn
            q = _heads(cross.q_proj(hidden), h, d)
            if self.with_past:
                ck, cv = past[4 * i + 2], past[4 * i + 3]
            else:
                ck = _heads(cross.k_proj(encoder_hidden_states), h, d)
                cv = _heads(cross.v_proj(encoder_hidden_states), h, d)
                presents += [ck, cv]
            attended = cross.out_proj(_attend(q, ck, cv, cross_bias, cross.scaling, h * d))
            hidden = layer.encoder_attn_layer_norm(hidden + attended)

            ffn = layer.fc2(self.activation(layer.fc1(hidden)))
            hidden = layer.final_layer_norm(hidden + ffn)
        return (self.lm_head(hidden), *presents)

    def input_names(self) -> list[str]:
        if self.with_past:
            return ["inputs_embeds", "encoder_attention_mask", *past_names(self.shape.layers)]
        return ["inputs_embeds", "encoder_attention_mask", "encoder_hidden_states"]

    def output_names(self) -> list[str]:
        return ["logits", *past_names(self.shape.layers, "present", with_encoder=not self.with_past)]
