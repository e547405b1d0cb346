#!/usr/bin/env python
"""Build tiny transformers parity fixtures for the CLIP and T5 text encoders.

Run (from the repo root, with the reference venv that has torch + transformers):

    /work/venv-ref/bin/python tools/make_text_encoder_fixtures.py

Deletes and rewrites tests/fixtures/text_encoders/ (README.md included). Run it after tools/make_fixtures.py, which
deletes all of tests/fixtures/. Deterministic: fixed seeds, fp32, single-threaded CPU torch, no hub access.

Three component folders, each `config.json` + safetensors as `save_pretrained` writes them, plus `reference.npz`:
- clip_l: CLIPTextModel shaped like CLIP-L (quick_gelu, legacy eos_token_id 2: pooled at the largest id), its keys
  rewritten to the hub layout (`text_model.` prefix and the `text_model.embeddings.position_ids` buffer, as in the
  FLUX/SD3 repos); transformers' own loader is checked to give the same outputs from it.
- clip_g: CLIPTextModelWithProjection shaped like OpenCLIP bigG (gelu, eos_token_id 997: pooled at the first EOS).
- t5: T5EncoderModel v1.1 (gated-gelu), sharded (`model-0000N-of-0000M.safetensors` + index.json).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,  # noqa: E402
                          T5EncoderModel)
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "text_encoders"
MAX_TOTAL_BYTES = 3 * 1024 * 1024
VOCAB = 1000
BATCH = 3

CLIP_L = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=192, num_hidden_layers=3, num_attention_heads=3,
              max_position_embeddings=24, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
              bos_token_id=998, eos_token_id=2, pad_token_id=1)
CLIP_G = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=24, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=40,
              bos_token_id=996, eos_token_id=997, pad_token_id=0)
T5 = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=160, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
          layer_norm_epsilon=1e-6, eos_token_id=1, pad_token_id=0)
BUCKET_CONFIGS = ((32, 128), (8, 20))  # T5 v1.1 XXL's, and the fixture's
BUCKET_SPAN = 1000


def reinit(model: torch.nn.Module, seed: int) -> None:
    """Random weights with no 0/1 structure, so swapped or skipped tensors show up in the outputs.

    Linear weights normal(0, 1/sqrt(fan_in)); biases normal(0, 0.1); norm scales 1 + normal(0, 0.25);
    embeddings normal(0, 0.5); T5's relative attention bias normal(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.25 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "relative_attention_bias" in name:
                p.copy_(noise)
            elif "embedding" in name or name.startswith("shared"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
            assert not torch.any((p == 0) | (p == 1)), name


def clip_ids(rng: np.random.Generator, length: int, *, bos: int, eos: int, pad: int, tokens: tuple[int, int],
             eos_at: list[int], decoy: int | None = None) -> np.ndarray:
    """Rows [BOS, random tokens..., EOS, pad...] with the EOS of row i at eos_at[i] (pad may equal EOS).

    decoy: a token id above eos_token_id placed before the EOS, so the legacy argmax rule would pool the wrong
    position; it makes the fixture tell the two pooling rules apart.
    """
    ids = np.full((len(eos_at), length), pad, np.int64)
    for row, at in enumerate(eos_at):
        ids[row, 0] = bos
        ids[row, 1:at] = rng.integers(*tokens, at - 1)
        if decoy is not None:
            ids[row, at // 2] = decoy
        ids[row, at] = eos
    return ids


def penultimate_by_hook(model, text_model, ids: torch.Tensor) -> np.ndarray:
    """Output of the second-to-last encoder layer, captured by a hook (an independent check of hidden_states[-2])."""
    captured = {}
    handle = text_model.encoder.layers[-2].register_forward_hook(
        lambda module, args, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out))
    model(ids)
    handle.remove()
    return captured["h"].numpy()


def write_hub_clip_layout(folder: Path, max_positions: int) -> None:
    """Rewrite a transformers 5 CLIPTextModel save into the hub layout: `text_model.` keys + position_ids buffer."""
    path = folder / "model.safetensors"
    tensors = {f"text_model.{k}": v for k, v in load_file(path).items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(max_positions, dtype=torch.int64)[None]
    save_file(tensors, path, metadata={"format": "pt"})


def make_clip(name: str, cls, fields: dict, seed: int, ids: np.ndarray, hub_layout: bool) -> dict:
    torch.manual_seed(seed)
    model = cls(CLIPTextConfig(**fields)).eval()
    reinit(model, seed)
    folder = OUT / name
    model.save_pretrained(folder, safe_serialization=True)
    if hub_layout:
        write_hub_clip_layout(folder, fields["max_position_embeddings"])
    text_model = model.text_model if cls is CLIPTextModelWithProjection else model
    ids_t = torch.from_numpy(ids)
    with torch.no_grad():
        out = model(ids_t, output_hidden_states=True)
        pooled = text_model(ids_t).pooler_output
        penultimate = out.hidden_states[-2].numpy()
        np.testing.assert_array_equal(penultimate, penultimate_by_hook(model, text_model, ids_t))
        reloaded = cls.from_pretrained(folder).eval()
        again = reloaded(ids_t)
        np.testing.assert_array_equal(again.last_hidden_state.numpy(), out.last_hidden_state.numpy())
    ref = dict(input_ids=ids, last_hidden_state=out.last_hidden_state.numpy(), penultimate_hidden_state=penultimate,
               pooled=pooled.numpy())
    if cls is CLIPTextModelWithProjection:
        ref["text_embeds"] = out.text_embeds.numpy()
    return ref


def make_t5(seed: int, ids: np.ndarray) -> dict:
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**T5)).eval()
    reinit(model, seed)
    assert torch.equal(model.encoder.embed_tokens.weight, model.shared.weight), "embeddings not tied"
    folder = OUT / "t5"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="150KB")
    assert (folder / "model.safetensors.index.json").is_file(), "t5 fixture should be sharded"
    with torch.no_grad():
        out = model(torch.from_numpy(ids)).last_hidden_state.numpy()
        reloaded = T5EncoderModel.from_pretrained(folder).eval()
        np.testing.assert_array_equal(reloaded(torch.from_numpy(ids)).last_hidden_state.numpy(), out)
    ref = dict(input_ids=ids, last_hidden_state=out)
    relative = torch.arange(-BUCKET_SPAN, BUCKET_SPAN + 1)
    ref["relative_positions"] = relative.numpy()
    for buckets, distance in BUCKET_CONFIGS:
        ref[f"buckets_{buckets}_{distance}"] = T5Attention._relative_position_bucket(
            relative, bidirectional=True, num_buckets=buckets, max_distance=distance).numpy()
    return ref


def save_reference(name: str, ref: dict) -> None:
    arrays = {k: (v.astype(np.int32) if v.dtype.kind in "iu" else v.astype(np.float32)) for k, v in ref.items()}
    for k, v in arrays.items():
        assert np.all(np.isfinite(v)), k
        if v.dtype == np.float32 and v.ndim > 1:
            assert np.std(v) > 1e-2, f"{name}/{k} is degenerate"
    np.savez(OUT / name / "reference.npz", **arrays)


def write_readme() -> None:
    lines = [
        "# Text encoder parity fixtures (generated — do not edit)",
        "",
        "Made by `/work/venv-ref/bin/python tools/make_text_encoder_fixtures.py` (deletes and rewrites this folder).",
        f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}, CPU, fp32, "
        "1 thread, fixed seeds. Random weights: linear N(0, 1/fan_in), biases N(0, 0.1^2), norm scales "
        "1 + N(0, 0.25^2), embeddings N(0, 0.5^2), T5 relative bias N(0, 1); no weight is 0 or 1.",
        "",
        "- `clip_l/` CLIPTextModel like CLIP-L (FLUX.1 `text_encoder`), hub key layout (`text_model.` prefix, "
        "`text_model.embeddings.position_ids` buffer); legacy eos_token_id 2 (pool at the largest id); BOS 998, "
        "EOS 999 = the highest id, padded with EOS.",
        "- `clip_g/` CLIPTextModelWithProjection like bigG (SD3 `text_encoder_2`), as transformers 5 saves it; "
        "eos_token_id 997 (pool at the first EOS), BOS 996, padded with 0; each row holds id 999 before its EOS.",
        "- `t5/` T5EncoderModel v1.1 (gated-gelu; FLUX.1 `text_encoder_2`, SD3 `text_encoder_3`), sharded "
        "(`model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`), only `shared.weight` stored (tied); "
        "ids random, EOS 1, then pad 0.",
        "- `<name>/reference.npz` (float32; ints int32): `input_ids` [3, L] and the transformers outputs "
        "(no attention mask, as diffusers' pipelines call them). CLIP: `last_hidden_state` (after final_layer_norm), "
        "`penultimate_hidden_state` (hidden_states[-2], checked against a hook on the second-to-last layer), "
        "`pooled` (pooler_output), clip_g also `text_embeds`. T5: `last_hidden_state`, and "
        f"`buckets_<num_buckets>_<max_distance>` for {list(BUCKET_CONFIGS)}: transformers' bidirectional relative "
        "position bucket of each of `relative_positions` (-1000..1000).",
        "",
        "## Configs",
        f"- clip_l: `{json.dumps(CLIP_L, sort_keys=True)}`",
        f"- clip_g: `{json.dumps(CLIP_G, sort_keys=True)}`",
        f"- t5: `{json.dumps(T5, sort_keys=True)}`",
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines))


def main() -> int:
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    rng = np.random.default_rng(606)

    ids = clip_ids(rng, 16, bos=998, eos=999, pad=999, tokens=(1, 998), eos_at=[5, 11, 15])
    refs = {"clip_l": make_clip("clip_l", CLIPTextModel, CLIP_L, 6001, ids, hub_layout=True)}
    ids = clip_ids(rng, 16, bos=996, eos=997, pad=0, tokens=(1, 996), eos_at=[4, 9, 15], decoy=999)
    refs["clip_g"] = make_clip("clip_g", CLIPTextModelWithProjection, CLIP_G, 6002, ids, hub_layout=False)
    ids = np.zeros((BATCH, 32), np.int64)
    for row, at in enumerate([7, 20, 31]):
        ids[row, :at] = rng.integers(2, VOCAB, at)
        ids[row, at] = 1
    refs["t5"] = make_t5(6003, ids)
    for name, ref in refs.items():
        save_reference(name, ref)
    write_readme()

    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.stat().st_size:>9d}  {p.relative_to(OUT)}")
    print(f"total {total} bytes")
    if total > MAX_TOTAL_BYTES:
        print(f"fixtures exceed {MAX_TOTAL_BYTES} bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
