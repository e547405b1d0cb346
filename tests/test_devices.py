"""The notebooks' device check: a model that will not fit is refused with what to do, one that fits is reported."""

import dataclasses

import pytest

from ditfa_jax.devices import check_fits, memory_gb


@dataclasses.dataclass
class FakeDevice:
    platform: str
    device_kind: str
    limit: int | None

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit, "bytes_in_use": 0}


A100_40GB = FakeDevice("gpu", "NVIDIA A100-SXM4-40GB", int(37.9e9))
T4 = FakeDevice("gpu", "Tesla T4", int(14.2e9))
PRESETS = {"tiny": 0, "FLUX.1-dev": 36, "SD3.5-medium": 20}


def test_a_model_that_fits_is_reported():
    assert memory_gb(A100_40GB) == pytest.approx(37.9)
    report = check_fits(36, "FLUX.1-dev", device=A100_40GB)
    assert "NVIDIA A100-SXM4-40GB" in report and "37.9 GB" in report and "it fits" in report


def test_too_small_a_gpu_is_refused_with_what_fits(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    with pytest.raises(RuntimeError) as err:
        check_fits(36, "FLUX.1-dev", alternatives=PRESETS, device=T4)
    message = str(err.value)
    assert "FLUX.1-dev needs an accelerator with about 36 GB" in message and "Tesla T4" in message
    assert "14.2 GB" in message and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.75" in message
    assert "Runtime > Change runtime type" in message and "a preset that fits here: tiny" in message
    assert "SD3.5-medium" not in message  # 20 GB does not fit a T4 either


def test_a_cpu_is_refused_for_a_real_model_and_fine_for_the_tiny_one():
    cpu = FakeDevice("cpu", "cpu", None)
    with pytest.raises(RuntimeError, match="this runtime has only a CPU.*a preset that fits here: tiny"):
        check_fits(20, "SD3.5-medium", alternatives=PRESETS, device=cpu)
    assert "small enough for any device" in check_fits(0, "tiny", device=cpu)
    assert "small enough" in check_fits(0, "tiny")  # the real device of this machine


def test_a_device_that_does_not_report_memory_is_tried():
    assert "does not report its memory" in check_fits(36, "FLUX.1-dev", device=FakeDevice("tpu", "TPU v5", None))
