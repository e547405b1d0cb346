#!/usr/bin/env python
"""Build two tiny complete diffusers pipeline folders and their reference outputs for the end-to-end pipelines.

Run (from the repo root, with the reference venv that has torch + diffusers + transformers + sentencepiece):

    /work/venv-ref/bin/python tools/make_pipeline_fixtures.py

Deletes and rewrites tests/fixtures/pipelines/{flux_tiny,sd3_tiny}. Fully deterministic: fixed seeds, fp32,
single-threaded CPU torch. No download: the CLIP BPE vocabulary and the T5 SentencePiece model are trained here on
a small made-up corpus, in the formats of the real files (CLIP: vocab.json + merges.txt with `</w>` word ends and
`<|startoftext|>`/`<|endoftext|>`; T5: a unigram spiece model with <pad>=0, </s>=1, <unk>=2 saved by
T5TokenizerFast, so tokenizer.json is present).

flux_tiny: FluxPipeline (CLIPTextModel, T5EncoderModel, FluxTransformer2DModel with guidance_embeds, 16-channel
AutoencoderKL without quant convs, FlowMatchEulerDiscreteScheduler); its CLIP tokenizer folder has no
tokenizer.json (as FLUX.1-dev's). sd3_tiny: StableDiffusion3Pipeline (two CLIPTextModelWithProjection, the second
padding with "!" as SD3's bigG tokenizer does, T5, SD3Transformer2DModel, VAE).

reference.npz per folder (float32; ids int64; strings unicode arrays):
  prompts, tok_max_length_t5 and per tokenizer `ids_<name>` [P, max_length] (padding="max_length", truncation) as
  the pipelines call them (`<name>` = tokenizer, tokenizer_2, tokenizer_3); `prompts[1]` is cut by every tokenizer.
  Encode (encode_prompt, the pipeline's own code, max_sequence_length = `max_sequence_length`):
    FLUX: prompt_embeds [P, L, d_t5], pooled_prompt_embeds [P, d_clip].
    SD3: + negative_prompt_embeds, negative_pooled_prompt_embeds for `negative_prompt`;
         `no_t5_prompt_embeds` (text_encoder_3=None: zeros stand in for T5).
  Generate (`run_*`): prompts run_prompts (their encode_prompt outputs as run_prompt_embeds, ...), `noise` passed
  as `latents=`, height/width/steps/guidance, the final latents (output_type="latent"; FLUX packed [B, S, 64], SD3 [B, 16, h, w]) and decoded images (output_type="np",
  NHWC in [0, 1]).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sentencepiece as spm  # noqa: E402
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
from diffusers.utils import logging as dlogging  # noqa: E402
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,  # noqa: E402
                          T5Config, T5EncoderModel, T5TokenizerFast)
from transformers.utils import logging as tlogging  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from make_fixtures import randomize_, seed_all, to_np  # noqa: E402

dlogging.set_verbosity_error()
dlogging.disable_progress_bar()
tlogging.set_verbosity_error()
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "pipelines"
MAX_FOLDER_BYTES = 4 * 1024 * 1024

CORPUS = [
    "a photo of an astronaut riding a horse on the moon",
    "two cats sitting under a big green tree, watercolor",
    "a red cube on a blue table next to a yellow sphere!",
    "portrait of an old fisherman with a grey beard, 4k, highly detailed",
    "a city street at night in the rain with neon lights",
    "mountains and a lake at sunrise, soft light, 35mm film",
    "a bowl of ramen with eggs and green onions, studio lighting",
    "an oil painting of a lighthouse in a storm",
    "the quick brown fox jumps over the lazy dog",
    "don't you think it's a wonderful day? we'll see, they've said so",
    "three small robots playing chess in a library",
    "a cozy cabin in the snowy woods with smoke from the chimney",
]
LONG_PROMPT = " ".join(["a very long prompt about a red fox and a blue bird in a green forest at dawn"] * 8)
PROMPTS = ["a red fox in the snow, 4k!", LONG_PROMPT, "Two  ROBOTS playing chess... at night"]
RUN_PROMPTS = ["a photo of an astronaut riding a horse", "a bowl of ramen!"]
NEGATIVE = "blurry, low quality"
MAX_SEQUENCE_LENGTH = 32
HEIGHT = WIDTH = 64
STEPS = 3

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------
def clip_vocab_and_merges(num_merges: int = 250) -> tuple[dict, list[str]]:
    """A CLIP-format byte-level BPE (`</w>` word ends) learnt on CORPUS: bytes, bytes + </w>, merges, specials.

    Merges are learnt here (most frequent pair, ties to the smallest pair) rather than by the tokenizers trainer,
    whose tie-breaking is not deterministic; words are split by CLIP's own normaliser and pre-tokeniser.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    words: dict[tuple[str, ...], int] = {}
    for line in CORPUS:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)):
            symbols = (*word[:-1], word[-1] + "</w>")
            words[symbols] = words.get(symbols, 0) + 1
    merges = []
    for _ in range(num_merges):
        pairs: dict[tuple[str, str], int] = {}
        for w, count in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for w, count in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, [f"{a} {b}" for a, b in merges]


def write_clip_tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)


def write_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    spm_dir, cwd = Path(tempfile.mkdtemp()), os.getcwd()
    os.chdir(spm_dir)  # the trainer records model_prefix in the model: keep it free of the temp path
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS * 4), model_prefix="spiece", vocab_size=110, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            character_coverage=1.0, num_threads=1, minloglevel=2, shuffle_input_sentence=False)
    finally:
        os.chdir(cwd)
    (spm_dir / "spiece.vocab").unlink()
    tok = T5TokenizerFast.from_pretrained(spm_dir, model_max_length=512)  # converts spiece.model (+ 100 extra ids)
    tok.save_pretrained(folder)
    shutil.copy(spm_dir / "spiece.model", folder / "spiece.model")
    shutil.rmtree(spm_dir)
    return T5TokenizerFast.from_pretrained(folder)


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------
def clip_model(cls, tok: CLIPTokenizer, *, hidden: int, projection: int, act: str, gen):
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=projection,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = cls(cfg).eval()
    randomize_(model, gen)
    return model


def t5_model(tok: T5TokenizerFast, *, d_model: int, gen) -> T5EncoderModel:
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=3,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    model = T5EncoderModel(cfg).eval()
    randomize_(model, gen)
    return model


def vae_model(*, scaling_factor: float, shift_factor: float, gen) -> AutoencoderKL:
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=scaling_factor,
                        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False).eval()
    randomize_(vae, gen)
    return vae


# ----------------------------------------------------------------------------
# Reference data
# ----------------------------------------------------------------------------
def token_ids(tok, prompts, max_length: int) -> np.ndarray:
    ids = tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np").input_ids
    full = tok(prompts, padding="longest", return_tensors="np").input_ids
    assert full.shape[1] > max_length, f"{type(tok).__name__}: the long prompt must be truncated"
    return ids.astype(np.int64)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_flux(folder: Path) -> None:
    gen = seed_all(6001)
    tmp = Path(tempfile.mkdtemp())
    tok = write_clip_tokenizer(tmp / "tokenizer", pad_token=EOS)
    tok_2 = write_t5_tokenizer(tmp / "tokenizer_2")
    text_encoder = clip_model(CLIPTextModel, tok, hidden=32, projection=32, act="quick_gelu", gen=gen)
    text_encoder_2 = t5_model(tok_2, d_model=48, gen=gen)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    randomize_(transformer, gen)
    vae = vae_model(scaling_factor=0.3611, shift_factor=0.1159, gen=gen)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=tok_2, transformer=transformer.eval())
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the real CLIP-L tokenizer folder: vocab + merges, no tokenizer.json
        shutil.copy(tmp / "tokenizer" / name, folder / "tokenizer" / name)
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    shutil.copy(tmp / "tokenizer_2" / "spiece.model", folder / "tokenizer_2" / "spiece.model")
    shutil.rmtree(tmp)

    pipe = FluxPipeline.from_pretrained(folder)  # reference outputs come from what was written
    data = dict(prompts=np.array(PROMPTS), max_sequence_length=np.int64(MAX_SEQUENCE_LENGTH),
                ids_tokenizer=token_ids(pipe.tokenizer, PROMPTS, 77),
                ids_tokenizer_2=token_ids(pipe.tokenizer_2, PROMPTS, MAX_SEQUENCE_LENGTH),
                ids_tokenizer_2_512=token_ids(pipe.tokenizer_2, PROMPTS + [LONG_PROMPT * 3], 512)[:len(PROMPTS)])
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQUENCE_LENGTH)
        data.update(prompt_embeds=to_np(embeds), pooled_prompt_embeds=to_np(pooled))
        noise = torch.randn(len(RUN_PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=gen)
        packed = FluxPipeline._pack_latents(noise, len(RUN_PROMPTS), 16, HEIGHT // 8, WIDTH // 8)
        run = dict(prompt=RUN_PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=3.5,
                   max_sequence_length=MAX_SEQUENCE_LENGTH)
        latents = pipe(**run, latents=packed.clone(), output_type="latent").images
        images = pipe(**run, latents=packed.clone(), output_type="np").images
        run_embeds, run_pooled, _ = pipe.encode_prompt(RUN_PROMPTS, max_sequence_length=MAX_SEQUENCE_LENGTH)
    data.update(run_prompt_embeds=to_np(run_embeds), run_pooled_prompt_embeds=to_np(run_pooled))
    data.update(run_prompts=np.array(RUN_PROMPTS), run_height=np.int64(HEIGHT), run_width=np.int64(WIDTH),
                run_steps=np.int64(STEPS), run_guidance_scale=np.float32(3.5), noise=to_np(packed),
                run_latents=to_np(latents), run_images=np.asarray(images, np.float32))
    finish(folder, data)


def make_sd3(folder: Path) -> None:
    gen = seed_all(6002)
    tmp = Path(tempfile.mkdtemp())
    tok = write_clip_tokenizer(tmp / "tokenizer", pad_token=EOS)
    tok_2 = write_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")  # SD3's bigG tokenizer pads with "!"
    tok_3 = write_t5_tokenizer(tmp / "tokenizer_3")
    text_encoder = clip_model(CLIPTextModelWithProjection, tok, hidden=32, projection=32, act="quick_gelu", gen=gen)
    text_encoder_2 = clip_model(CLIPTextModelWithProjection, tok_2, hidden=48, projection=48, act="gelu", gen=gen)
    text_encoder_3 = t5_model(tok_3, d_model=96, gen=gen)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=96,
                                        caption_projection_dim=32, pooled_projection_dim=80, out_channels=16,
                                        pos_embed_max_size=16)
    randomize_(transformer, gen)
    vae = vae_model(scaling_factor=1.5305, shift_factor=0.0609, gen=gen)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tok_2, text_encoder_3=text_encoder_3,
                                    tokenizer_3=tok_3, transformer=transformer.eval())
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tmp / sub / name, folder / sub / name)
    shutil.copy(tmp / "tokenizer_3" / "spiece.model", folder / "tokenizer_3" / "spiece.model")
    shutil.rmtree(tmp)

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    data = dict(prompts=np.array(PROMPTS), max_sequence_length=np.int64(MAX_SEQUENCE_LENGTH),
                negative_prompt=np.array(NEGATIVE),
                ids_tokenizer=token_ids(pipe.tokenizer, PROMPTS, 77),
                ids_tokenizer_2=token_ids(pipe.tokenizer_2, PROMPTS, 77),
                ids_tokenizer_3=token_ids(pipe.tokenizer_3, PROMPTS, MAX_SEQUENCE_LENGTH))
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, negative_prompt=NEGATIVE, max_sequence_length=MAX_SEQUENCE_LENGTH)
        data.update(prompt_embeds=to_np(embeds), negative_prompt_embeds=to_np(neg),
                    pooled_prompt_embeds=to_np(pooled), negative_pooled_prompt_embeds=to_np(neg_pooled))
        no_t5 = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
        data["no_t5_prompt_embeds"] = to_np(no_t5.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                                max_sequence_length=MAX_SEQUENCE_LENGTH)[0])
        noise = torch.randn(len(RUN_PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=gen)
        run = dict(prompt=RUN_PROMPTS, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                   num_inference_steps=STEPS, guidance_scale=5.0, max_sequence_length=MAX_SEQUENCE_LENGTH)
        latents = pipe(**run, latents=noise.clone(), output_type="latent").images
        images = pipe(**run, latents=noise.clone(), output_type="np").images
        run_cond = pipe.encode_prompt(RUN_PROMPTS, None, None, negative_prompt=NEGATIVE,
                                      max_sequence_length=MAX_SEQUENCE_LENGTH)
    data.update({f"run_{k}": to_np(v) for k, v in zip(
        ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"), run_cond)})
    data.update(run_prompts=np.array(RUN_PROMPTS), run_height=np.int64(HEIGHT), run_width=np.int64(WIDTH),
                run_steps=np.int64(STEPS), run_guidance_scale=np.float32(5.0), noise=to_np(noise),
                run_latents=to_np(latents), run_images=np.asarray(images, np.float32))
    finish(folder, data)


def finish(folder: Path, data: dict) -> None:
    for key in ("run_latents", "run_images", "prompt_embeds", "pooled_prompt_embeds"):
        a = data[key]
        if not np.all(np.isfinite(a)) or a.std() < 1e-3:
            raise AssertionError(f"{folder.name}: {key} looks trivial (std {a.std()})")
    np.savez(folder / "reference.npz", **data)
    size = folder_bytes(folder)
    if size > MAX_FOLDER_BYTES:
        raise AssertionError(f"{folder}: {size} bytes > {MAX_FOLDER_BYTES}")
    print(f"{folder.relative_to(ROOT)}: {size / 1024:.0f} KiB; " +
          ", ".join(f"{k} {tuple(v.shape)}" for k, v in data.items() if v.ndim))


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    make_flux(OUT / "flux_tiny")
    make_sd3(OUT / "sd3_tiny")
    return 0


if __name__ == "__main__":
    sys.exit(main())
