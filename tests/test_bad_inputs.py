"""Bad input, table by table: each case names the exception (API) or exit status 2 / 1 (CLI), a fragment of the
message, and for the CLI that stderr is one line without a traceback and that --out holds nothing new.

Also: hypothesis-drawn bad config values, two processes racing for one output, SIGTERM inside `atomic_folder`,
NaN weights named by tensor, non-finite sampling named by step, and the real hub configs still loading.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from convert import ConversionError
from convert.checkpoint import TensorSource
from ditfa_jax.cli import main as cli_main
from ditfa_jax.configs import CheckedConfig, FluxConfig, SD3Config, config_from_dict, read_json
from ditfa_jax.files import atomic_folder, atomic_write
from ditfa_jax.memory import InsufficientMemoryError
from ditfa_jax.models.clip import CLIPTextConfig
from ditfa_jax.models.t5 import T5Config
from ditfa_jax.models.vae import VAEConfig
from ditfa_jax.scheduler import SchedulerConfig

ROOT = Path(__file__).parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
FLUX_TINY = FIXTURES / "pipelines" / "flux_tiny"
WEIGHTS = "diffusion_pytorch_model.safetensors"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def fixture_json(*parts) -> dict:
    return json.loads(FIXTURES.joinpath(*parts).read_text())


FLUX_RAW = fixture_json("flux_dev", "transformer", "config.json")
SD3_RAW = fixture_json("sd35_medium", "transformer", "config.json")
VAE_RAW = fixture_json("vae", "flux", "config.json")
CLIP_RAW = fixture_json("pipelines", "sd3_tiny", "text_encoder", "config.json")
T5_RAW = fixture_json("pipelines", "sd3_tiny", "text_encoder_3", "config.json")
SCHEDULER_RAW = fixture_json("flux_dev", "scheduler", "scheduler_config.json")


def copy_fixture(tmp_path, name) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "transformer" / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return folder


def edit_weights(folder: Path, edit) -> Path:
    path = folder / "transformer" / WEIGHTS
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return folder


def set_nan(key, index=(0, 0)):
    def edit(tensors):
        tensors[key] = tensors[key].copy()
        tensors[key][index] = np.nan
    return edit


def weights_file(tmp_path) -> Path:
    """A copy of the sd3 fixture; returns its transformer weights file for tests to damage."""
    return copy_fixture(tmp_path, "sd3") / "transformer" / WEIGHTS


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header (data left as it is)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = edit(json.loads(data[8:8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


# ---- configs: the API ----------------------------------------------------------------------------------------

def without(raw, key):
    return {k: v for k, v in raw.items() if k != key}


CONFIG_CASES = [  # (id, build, exception, message fragment)
    ("missing heads", lambda: config_from_dict(without(FLUX_RAW, "num_attention_heads"), "cfg.json"), ValueError,
     "cfg.json: missing required field(s) ['num_attention_heads']"),
    ("bool as int", lambda: config_from_dict({**FLUX_RAW, "num_layers": True}), ValueError,
     "num_layers=True (bool); expected an integer"),
    ("string as bool", lambda: config_from_dict({**FLUX_RAW, "guidance_embeds": "false"}), ValueError,
     "guidance_embeds='false' (str); expected true/false"),
    ("float as int", lambda: config_from_dict({**FLUX_RAW, "attention_head_dim": 16.0}), ValueError,
     "attention_head_dim=16.0 (float); expected an integer"),
    ("negative layers", lambda: config_from_dict({**FLUX_RAW, "num_single_layers": -1}), ValueError,
     "num_single_layers=-1; expected a value >= 1"),
    ("rope not a list", lambda: config_from_dict({**FLUX_RAW, "axes_dims_rope": "4,6,6"}), ValueError,
     "expected a list of integers"),
    ("rope odd", lambda: config_from_dict({**FLUX_RAW, "attention_head_dim": 15, "axes_dims_rope": [4, 6, 5]}),
     ValueError, "every axis must be even"),
    ("unknown qk_norm", lambda: config_from_dict({**SD3_RAW, "qk_norm": "layer_norm"}), ValueError,
     "qk_norm='layer_norm' is not supported; expected one of [None, 'rms_norm']"),
    ("dual layer out of range", lambda: config_from_dict({**SD3_RAW, "dual_attention_layers": [0, 7]}), ValueError,
     "dual_attention_layers [7] lie outside"),
    ("not an object", lambda: config_from_dict([FLUX_RAW], "cfg.json"), ValueError,
     "cfg.json: expected a JSON object"),
    ("unknown class", lambda: config_from_dict(without(FLUX_RAW, "_class_name")), ValueError, "unknown model type"),
    ("direct construction", lambda: FluxConfig(num_layers=0), ValueError, "FluxConfig: num_layers=0"),
    ("vae scaling_factor missing", lambda: VAEConfig.from_dict(without(VAE_RAW, "scaling_factor")), ValueError,
     "missing required field(s) ['scaling_factor']"),
    ("vae channels as string", lambda: VAEConfig.from_dict({**VAE_RAW, "latent_channels": "16"}), ValueError,
     "latent_channels='16' (str); expected an integer"),
    ("vae no blocks", lambda: VAEConfig.from_dict({**VAE_RAW, "block_out_channels": [], "down_block_types": [],
                                                   "up_block_types": []}), ValueError, "block_out_channels is empty"),
    ("clip activation", lambda: CLIPTextConfig.from_dict({**CLIP_RAW, "hidden_act": "swish"}), ValueError,
     "hidden_act='swish' is not supported"),
    ("clip eps zero", lambda: CLIPTextConfig.from_dict({**CLIP_RAW, "layer_norm_eps": 0}), ValueError,
     "layer_norm_eps=0.0; expected a value > 0"),
    ("t5 zero heads", lambda: T5Config.from_dict({**T5_RAW, "num_heads": 0}), ValueError, "num_heads=0"),
    ("t5 not an object", lambda: T5Config.from_dict("t5"), ValueError, "expected a T5 encoder config"),
    ("scheduler NaN", lambda: SchedulerConfig.from_dict(json.loads('{"shift": NaN}')), ValueError,
     "shift=nan (float); expected a finite number"),
    ("scheduler inf", lambda: SchedulerConfig.from_dict(json.loads('{"base_shift": -Infinity}')), ValueError,
     "base_shift=-inf"),
    ("scheduler class", lambda: SchedulerConfig.from_dict({"_class_name": "DDIMScheduler"}), ValueError,
     "only 'FlowMatchEulerDiscreteScheduler' is supported"),
    ("scheduler absurd", lambda: SchedulerConfig.from_dict({"num_train_timesteps": 10 ** 12}), ValueError,
     "num_train_timesteps=1000000000000; expected a value >= 1 and <= 1000000"),
    ("scheduler bool string", lambda: SchedulerConfig.from_dict({"use_dynamic_shifting": "true"}), ValueError,
     "use_dynamic_shifting='true'"),
]


@pytest.mark.parametrize("build,exc,fragment", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused(build, exc, fragment):
    with pytest.raises(exc) as info:
        build()
    assert fragment in str(info.value)


def test_read_json_needs_an_object(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "junk.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"list.json: expected a JSON object"):
        read_json(tmp_path / "list.json")
    with pytest.raises(ValueError, match=r"junk.json: not valid JSON"):
        read_json(tmp_path / "junk.json")


# As published on the Hugging Face Hub (transformer/config.json, bookkeeping fields left out). FLUX.1 omits
# axes_dims_rope and out_channels, SD3-medium omits qk_norm and dual_attention_layers: diffusers added them later.
HUB_CONFIGS = {
    "FLUX.1-dev": ({"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True,
                    "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                    "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}, 11_901_408_320),
    "FLUX.1-schnell": ({"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": False,
                        "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                        "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}, None),
    "SD3-medium": ({"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
                    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
                    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
                    "sample_size": 128}, None),
    "SD3.5-large": ({"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 2432,
                     "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38,
                     "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
                     "qk_norm": "rms_norm", "sample_size": 128}, None),
    "SD3.5-medium": ({"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
                      "dual_attention_layers": list(range(13)), "in_channels": 16, "joint_attention_dim": 4096,
                      "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
                      "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                      "sample_size": 128}, None),
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_configs_load_with_diffusers_defaults(name):
    from convert.diffusers_to_jax import build_abstract
    from ditfa_jax.memory import state_bytes

    raw, params = HUB_CONFIGS[name]
    config = config_from_dict(raw, name)
    assert all(getattr(config, k) == (tuple(v) if isinstance(v, list) else v)
               for k, v in raw.items() if k != "_class_name")
    if params is not None:  # FLUX.1-dev's published count, from shapes alone (nothing allocated)
        assert config.axes_dims_rope == (16, 56, 56) and config.out_channels is None
        assert state_bytes(build_abstract(config, np.float32)[1]) == 4 * params


def test_fixture_configs_load():
    """Every config.json among the fixtures loads through its class (the tiny models, text encoders, VAEs)."""
    loaded = 0
    for path in FIXTURES.rglob("*config.json"):
        raw = json.loads(path.read_text())
        if raw.get("_class_name") in ("FluxTransformer2DModel", "SD3Transformer2DModel"):
            config_from_dict(raw, str(path))
        elif raw.get("_class_name") == "AutoencoderKL":
            VAEConfig.from_dict(raw, str(path))
        elif raw.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
            SchedulerConfig.from_dict(raw, str(path))
        elif raw.get("model_type") == "clip_text_model":
            CLIPTextConfig.from_dict(raw, str(path))
        elif raw.get("model_type") == "t5":
            T5Config.from_dict(raw, str(path))
        else:
            continue
        loaded += 1
    assert loaded >= 25


# ---- configs: hypothesis-drawn bad values --------------------------------------------------------------------

CLASSES = {FluxConfig: FLUX_RAW, SD3Config: SD3_RAW, VAEConfig: VAE_RAW, CLIPTextConfig: CLIP_RAW, T5Config: T5_RAW,
           SchedulerConfig: SCHEDULER_RAW}
FROM_DICT = {FluxConfig: config_from_dict, SD3Config: config_from_dict}
NOT_NUMBERS = st.one_of(st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def bad_values(cls, field):
    """Values the field must refuse, from its declared type (as text: "int", "int | None", "tuple[int, ...]",
    ...) and range; never None (absent) and never a value of the right type within range."""
    import typing

    text = str(typing.get_type_hints(cls)[field.name]).replace("<class '", "").replace("'>", "")
    lo, above, choices = field.metadata["min"], field.metadata["above"], field.metadata["choices"]
    if text in ("bool",):
        return st.one_of(st.integers(), st.text(max_size=5), st.floats())
    if text in ("str", "str | None"):
        other_text = st.text(max_size=8).filter(lambda s: s not in choices) if choices else st.nothing()
        return st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=2), min_size=1, max_size=2),
                         other_text)
    if text in ("float", "float | None"):
        low = st.nothing()
        if lo is not None or above is not None:
            low = st.floats(max_value=lo if lo is not None else above, exclude_max=lo is not None, allow_nan=False)
        return st.one_of(NOT_NUMBERS, NON_FINITE, low)
    low_int = st.nothing() if lo is None else st.integers(max_value=lo - 1)
    if text in ("int", "int | None"):
        return st.one_of(NOT_NUMBERS, st.floats(allow_nan=True), low_int)
    assert "tuple[" in text, text
    entries = st.booleans() if "tuple[int" in text else st.integers()  # wrong-typed entries
    lists = st.lists(st.one_of(entries, st.lists(low_int, min_size=1, max_size=1).map(lambda v: v[0])),
                     min_size=1, max_size=3)
    if text.startswith("int |"):  # int | tuple[int, ...]: any float is wrong, as is an int below the minimum
        return st.one_of(st.text(max_size=5), st.booleans(), st.floats(allow_nan=True), low_int, lists)
    return st.one_of(st.text(max_size=5), st.integers(), lists)


def field_and_bad_value():
    import dataclasses

    pairs = [(cls, f) for cls in CLASSES for f in dataclasses.fields(cls)]
    return st.sampled_from(pairs).flatmap(lambda p: st.tuples(st.just(p[0]), st.just(p[1]), bad_values(*p)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field_and_bad_value())
def test_hypothesis_bad_values_are_refused_naming_the_field(case):
    cls, field, value = case
    raw = {**CLASSES[cls], field.name: value}
    build = FROM_DICT.get(cls, lambda r, s: cls.from_dict(r, s))
    with pytest.raises(ValueError) as info:
        build(raw, "cfg.json")
    assert f"cfg.json: {field.name}=" in str(info.value)


@pytest.mark.parametrize("cls", list(CLASSES))
def test_every_config_class_uses_the_checker(cls):
    """One helper for all: every config dataclass derives from CheckedConfig and declares its fields with
    `setting` (so the hypothesis test covers each), and the base configs the test edits are valid."""
    import dataclasses

    assert issubclass(cls, CheckedConfig)
    assert all("choices" in f.metadata for f in dataclasses.fields(cls))
    FROM_DICT.get(cls, lambda r, s: cls.from_dict(r, s))(CLASSES[cls], "ok")


# ---- weights: the API ----------------------------------------------------------------------------------------

def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_header_length(path):
    path.write_bytes(struct.pack("<Q", 2 ** 60) + path.read_bytes()[8:])


def huge_tensor(path):
    def edit(header):
        key = next(k for k in header if k != "__metadata__")
        header[key]["shape"] = [10 ** 12, 10 ** 12]
        return header
    rewrite_header(path, edit)


def int8_weight(path):
    tensors = load_file(str(path))
    tensors["proj_out.weight"] = np.ones(tensors["proj_out.weight"].shape, np.int8)
    save_file(tensors, str(path))


def escaping_index(tmp_path):
    folder = copy_fixture(tmp_path, "flux_schnell") / "transformer"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    raw = json.loads(index.read_text())
    key = next(iter(raw["weight_map"]))
    raw["weight_map"][key] = "../../outside.safetensors"
    index.write_text(json.dumps(raw))
    return folder.parent


def single_and_sharded(tmp_path):
    folder = copy_fixture(tmp_path, "flux_schnell")
    shutil.copyfile(FIXTURES / "flux_dev" / "transformer" / WEIGHTS, folder / "transformer" / WEIGHTS)
    return folder


def load(folder):
    from ditfa_jax.loading import load_transformer

    return load_transformer(folder, progress=False)


def damaged(damage):
    """A case: the sd3 fixture with its weights file damaged by `damage(path)`."""
    def make(tmp_path):
        path = weights_file(tmp_path)
        damage(path)
        return path.parents[1]
    return make


WEIGHT_CASES = [  # (id, make folder, exception, message fragments)
    ("empty file", damaged(lambda p: p.write_bytes(b"")), ValueError,
     [WEIGHTS, "(transformer weights)", "0 bytes, too short"]),
    ("truncated", damaged(truncate), ValueError, ["(transformer weights)", "the file is truncated"]),
    ("garbage", damaged(lambda p: p.write_bytes(bytes(range(256)) * 4)), ValueError,
     ["(transformer weights)", "expected a safetensors file"]),
    ("absurd header", damaged(damage_header_length), ValueError,
     ["claims a 1,152,921,504,606,846,976-byte header"]),
    ("huge tensor", damaged(huge_tensor), ValueError, ["[1000000000000, 1000000000000]", "the header is corrupt"]),
    ("int8 weights", damaged(int8_weight), ConversionError, ["'proj_out.weight' is I8", "quantised"]),
    ("index escapes", escaping_index, ValueError, ["weight_map names shards ['../../outside.safetensors'] outside"]),
    ("single and sharded", single_and_sharded, ValueError, ["both diffusion_pytorch_model.safetensors (single"]),
    ("NaN weight", lambda t: edit_weights(copy_fixture(t, "sd3"), set_nan("context_embedder.weight", (3, 5))),
     ConversionError, ["'context_embedder.weight' holds 1 NaN/Inf value(s) (first at index (3, 5))"]),
    ("NaN in a stacked layer", lambda t: edit_weights(copy_fixture(t, "flux_dev"),
                                                      set_nan("single_transformer_blocks.1.attn.to_k.weight", (2, 7))),
     ConversionError, ["'single_transformer_blocks.1.attn.to_k.weight' holds 1 NaN/Inf value(s) (first at index "
                       "(2, 7))"]),
    ("10^9 layers", lambda t: edit_config(copy_fixture(t, "flux_dev"), num_layers=10 ** 9),
     InsufficientMemoryError, ["the parameters of the FluxConfig cannot fit: it needs at least"]),
]


@pytest.mark.parametrize("make,exc,fragments", [c[1:] for c in WEIGHT_CASES], ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights_are_refused(tmp_path, make, exc, fragments):
    folder = make(tmp_path)
    start = time.perf_counter()
    with pytest.raises(exc) as info:
        load(folder)
    assert time.perf_counter() - start < 30  # refused from headers and shapes, not after a long allocation
    for fragment in fragments:
        assert fragment in str(info.value)


def test_converted_params_with_nan_are_named(tmp_path):
    from ditfa_jax.loading import save_converted

    out = save_converted(load(FIXTURES / "sd35_medium"), tmp_path / "converted")  # its segment 0 has 2 layers
    tensors = load_file(str(out / "params.safetensors"))
    key = next(k for k in tensors if k.startswith("segments/0/") and k.endswith("kernel"))
    tensors[key][1, 0, 0] = np.inf
    save_file(tensors, str(out / "params.safetensors"))
    with pytest.raises(ConversionError, match=rf"'{key} \(layer 1\)' holds 1 NaN/Inf"):
        load(out)


def test_other_loaders_name_the_component(tmp_path):
    from convert.vae import load_vae

    vae = tmp_path / "vae"
    shutil.copytree(FIXTURES / "vae" / "flux", vae)
    truncate(vae / WEIGHTS)
    with pytest.raises(ValueError, match=r"\(VAE weights\).*truncated"):
        load_vae(vae)
    t5 = tmp_path / "t5"
    shutil.copytree(FIXTURES / "text_encoders" / "t5", t5)
    (t5 / "model-00003-of-00004.safetensors").write_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match=r"model-00003-of-00004.safetensors \(T5 encoder weights\): 7 bytes"):
        TensorSource(t5, prefix="model", what="T5 encoder weights")


# ---- outputs: non-finite results -----------------------------------------------------------------------------

def test_first_bad_step_is_named():
    from ditfa_jax.denoise import NonFiniteError, check_finite_steps

    check_finite_steps(np.array([True, True]), np.array([1.0, 0.5, 0.0]))
    with pytest.raises(NonFiniteError, match=r"first at step 3 of 4 \(sigma 0.5 -> 0.25\)"):
        check_finite_steps(np.array([True, True, False, False]), np.array([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_sampler_flags_nan_latents_at_the_step_that_made_them():
    """Finite inputs give no error; a NaN in the initial latents is caught after the first step."""
    from ditfa_jax.denoise import NonFiniteError
    from ditfa_jax.sampler import sample

    model = load(FIXTURES / "sd3")
    text, pooled = np.ones((1, 5, 32), np.float32), np.ones((1, 24), np.float32)
    latents = np.ones((1, 4, 8, 8), np.float32)
    kw = dict(height=64, width=64, num_steps=3, guidance_scale=1.0)
    assert np.isfinite(np.asarray(sample(model, latents, text, pooled, **kw))).all()
    latents[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="first at step 1 of 3"):
        sample(model, latents, text, pooled, **kw)


# ---- outputs: exclusive creation, two processes --------------------------------------------------------------

RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ditfa_jax.files import atomic_folder, atomic_write
    who, folder, rounds, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    while time.time() < start:
        pass
    wins = 0
    for i in range(rounds):
        try:
            if i % 2:
                with atomic_folder(folder / f"dir{i}") as tmp:
                    (tmp / "who").write_text(who * 1000)
            else:
                atomic_write(folder / f"file{i}", (who * 100000).encode(), overwrite=False)
            wins += 1
        except FileExistsError:
            pass
    print(wins)
""")


def test_two_processes_cannot_both_create_one_output(tmp_path):
    rounds = 200
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", RACE, who, str(tmp_path), str(rounds), str(start)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in "ab"]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    wins = [int(out) for out, _ in outs]
    assert sum(wins) == rounds, wins  # each target created exactly once
    for i in range(rounds):
        content = (tmp_path / f"file{i}").read_bytes() if i % 2 == 0 else (tmp_path / f"dir{i}" / "who").read_bytes()
        assert content in (b"a" * len(content), b"b" * len(content)) and len(content) in (100000, 1000)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "partial" in p.name) == []


def test_atomic_write_refuses_an_existing_file(tmp_path):
    target = tmp_path / "x.bin"
    atomic_write(target, b"old")
    with pytest.raises(FileExistsError, match="x.bin exists"):
        atomic_write(target, b"new", overwrite=False)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


# ---- outputs: SIGTERM inside atomic_folder -------------------------------------------------------------------

BLOCKED = textwrap.dedent("""
    import sys, time
    from ditfa_jax.files import atomic_folder
    with atomic_folder(sys.argv[1]) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(60)
""")


def test_sigterm_removes_the_partial_folder(tmp_path):
    target = tmp_path / "converted"
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED, str(target)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = Path(proc.stdout.readline().strip())
    assert partial.is_dir() and partial.parent == tmp_path
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM  # SystemExit(143), after cleanup (a plain kill would be -15)
    assert list(tmp_path.iterdir()) == []


def test_signal_handler_is_restored(tmp_path):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM already has a handler here; atomic_folder leaves those alone")
    with atomic_folder(tmp_path / "out") as tmp:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        (tmp / "f").write_text("x")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and (tmp_path / "out" / "f").is_file()


# ---- the CLI -------------------------------------------------------------------------------------------------

def run_cli(capsys, argv, out: Path | None = None) -> tuple[int, str]:
    """cli_main(argv): (exit status, stderr); --out must hold afterwards exactly what it held before."""
    before = sorted(out.rglob("*")) if out is not None and out.exists() else None
    capsys.readouterr()
    try:
        code = cli_main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    if out is not None:
        assert (sorted(out.rglob("*")) if out.exists() else None) == before, "the command left files in --out"
    return code, err


def assert_one_line(err: str, command: str):
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"ditfa {command}: "), err


PARSE_CASES = [  # argv, fragment: refused by argparse, before any import of the model code
    (["sample", "x", "--steps", "0"], "argument --steps: expected an integer in 1..10000, got 0"),
    (["sample", "x", "--steps", "many"], "expected an integer in 1..10000, got 'many'"),
    (["sample", "x", "--batch", "-3"], "argument --batch: expected an integer >= 1, got -3"),
    (["sample", "x", "--height", "0"], "argument --height: expected an integer in 1..65536, got 0"),
    (["sample", "x", "--text-len", "0"], "argument --text-len: expected an integer >= 1"),
    (["generate", "x", "--seed", "-1"], "argument --seed: expected an integer in 0..4294967295, got -1"),
    (["generate", "x", "--seed", str(2 ** 32)], "expected an integer in 0..4294967295, got 4294967296"),
    (["generate", "x", "--num-images", "0"], "argument --num-images: expected an integer >= 1"),
    (["generate", "x", "--max-sequence-length", "513"], "expected an integer in 1..512, got 513"),
    (["generate", "x", "--name", "../escape_"], "argument --name: expected a file name prefix without '/'"),
    (["generate", "x", "--guidance", "nan"], "argument --guidance: expected a finite number >= 0.0, got 'nan'"),
    (["calibrate", "x", "--out", "p.json", "--delta", "inf"], "argument --delta: expected a finite number"),
    (["calibrate", "x", "--out", "p.json", "--c", "0"], "argument --c: expected a finite number > 0.0"),
    (["bench", "x", "--repeat", "0"], "argument --repeat: expected an integer >= 1"),
    (["demo", "--prompts", "0"], "argument --prompts: expected an integer >= 1"),
    (["convert", "only_one"], "the following arguments are required: out_dir"),
    (["sample", "x", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv,fragment", PARSE_CASES, ids=[" ".join(a[:1] + a[2:3]) for a, _ in PARSE_CASES])
def test_cli_refuses_bad_arguments_at_parse_time(capsys, argv, fragment):
    code, err = run_cli(capsys, argv)
    assert code == 2 and fragment in err
    assert_one_line(err, argv[0])


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: these requests must be refused before one."""
    import ditfa_jax.loading as loading
    import ditfa_jax.pipelines as pipelines

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr(loading, "load_transformer", refuse)
    monkeypatch.setattr(pipelines, "load_pipeline", refuse)


def cli_case(name):
    """(argv, out folder to watch, fragment) for a refused-before-loading CLI case, built in tmp_path."""
    def build(tmp_path):
        out = tmp_path / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        if name == "out is a file":
            return ["generate", str(FLUX_TINY), "--prompt", "a", "--out", str(out / "keep.txt")], out, "is a file"
        if name == "out under a file":
            return (["sample", str(FIXTURES / "flux_dev"), "--out", str(out / "keep.txt" / "l.npy")], out,
                    "cannot be created: ")
        if name == "out exists":
            return ["sample", str(FIXTURES / "flux_dev"), "--out", str(out / "keep.txt")], out, "keep.txt exists"
        if name == "sample out is a folder":
            return ["sample", str(FIXTURES / "flux_dev"), "--out", str(out)], out, "is a folder; expected a file"
        if name == "convert onto a folder":
            return ["convert", str(FIXTURES / "sd3"), str(out)], out, "out exists"
        if name == "images exist":
            (out / "image_000.png").write_bytes(b"not mine to overwrite")
            return ["generate", str(FLUX_TINY), "--prompt", "a", "--out", str(out)], out, "image_000.png exists"
        if name == "10^9 layers":
            folder = edit_config(copy_fixture(tmp_path, "flux_dev"), num_layers=10 ** 9)
            return ["sample", str(folder), "--out", str(out / "l.npy")], out, "FluxConfig (bfloat16) cannot fit"
        if name == "run too large":
            return (["sample", str(FIXTURES / "flux_dev"), "--height", "65536", "--width", "65536", "--batch",
                     "64", "--out", str(out / "l.npy")], out, "a run of 64 x 16777232 tokens")
        if name == "config not an object":
            folder = copy_fixture(tmp_path, "flux_dev")
            (folder / "transformer" / "config.json").write_text("[]")
            return ["sample", str(folder), "--out", str(out / "l.npy")], out, "expected a JSON object"
        if name == "config missing heads":
            folder = copy_fixture(tmp_path, "flux_dev")
            raw = json.loads((folder / "transformer" / "config.json").read_text())
            del raw["num_attention_heads"]
            (folder / "transformer" / "config.json").write_text(json.dumps(raw))
            return ["calibrate", str(folder), "--out", str(out / "p.json")], out, "['num_attention_heads']"
        raise KeyError(name)
    return build


CLI_CASES = ["out is a file", "out under a file", "out exists", "sample out is a folder", "convert onto a folder",
             "images exist", "10^9 layers", "run too large", "config not an object", "config missing heads"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_refuses_before_loading(tmp_path, capsys, no_loading, name):
    argv, out, fragment = cli_case(name)(tmp_path)
    code, err = run_cli(capsys, argv, out)
    assert code == 2 and fragment in err, err
    assert_one_line(err, argv[0])
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_cli_refuses_an_unwritable_out(tmp_path, capsys, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, err = run_cli(capsys, ["sample", str(FIXTURES / "flux_dev"), "--out", str(locked / "l.npy")], locked)
    assert code == 2 and "cannot be written: no write permission" in err


BAD_LOAD_CASES = [  # loaded, then refused: weights and embeddings named (exit 2), nothing written
    ("NaN weight", lambda t: edit_weights(copy_fixture(t, "sd3"), set_nan("proj_out.weight")), [],
     "'proj_out.weight' holds 1 NaN/Inf"),
    ("truncated weights", damaged(truncate), [], "(transformer weights): tensor"),
    ("garbage embeddings", lambda t: FIXTURES / "sd3", ["--embeddings", "junk.npz"], "not a readable .npz"),
]


@pytest.mark.parametrize("make,extra,fragment", [c[1:] for c in BAD_LOAD_CASES], ids=[c[0] for c in BAD_LOAD_CASES])
def test_cli_bad_weights_and_embeddings(tmp_path, capsys, make, extra, fragment):
    folder = make(tmp_path)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "out"
    extra = [str(tmp_path / e) if e.endswith(".npz") else e for e in extra]
    code, err = run_cli(capsys, ["sample", str(folder), "--steps", "2", "--height", "64", "--width", "64", "--out",
                                 str(out / "l.npy"), *extra], out)
    assert code == 2 and fragment in err, err
    assert_one_line(err, "sample")
    assert not out.exists()


def test_cli_nan_output_exits_1_and_writes_nothing(tmp_path, capsys):
    """NaN prompt embeddings: sampling fails at step 1 (exit 1, one line), and no latents file appears."""
    emb = tmp_path / "nan.npz"
    np.savez(emb, prompt_embeds=np.full((1, 5, 32), np.nan, np.float32),
             pooled_prompt_embeds=np.ones((1, 24), np.float32))
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["sample", str(FIXTURES / "flux_dev"), "--steps", "2", "--height", "64", "--width",
                                 "64", "--embeddings", str(emb), "--out", str(out / "l.npy")], out)
    assert code == 1 and "ditfa sample: failed: sampling produced NaN/Inf latents, first at step 1 of 2" in err
    assert_one_line(err, "sample")
    assert not out.exists()


@pytest.mark.parametrize("argv,code,fragment", [
    (["sample", "x", "--seed", "-5"], 2, "argument --seed: expected an integer in 0..4294967295"),
    (["sample", "/nonexistent/ckpt"], 2, "/nonexistent/ckpt: no such file or folder"),
], ids=["parse", "runtime"])
def test_cli_in_a_real_process_prints_no_traceback(argv, code, fragment):
    proc = subprocess.run([sys.executable, "-m", "ditfa_jax.cli", *argv], env=ENV, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == code and fragment in proc.stderr, proc.stderr
    assert_one_line(proc.stderr, argv[0])
