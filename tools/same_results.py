"""Testbed plan search and generation with whichever `ditfa_jax` comes first on sys.path, saved to an .npz.

Checks that a refactor changed no result: run it once in an export of the old commit and once in the work tree,
then compare the files (every array bit for bit)::

    git archive OLD ditfa_jax pallas_kernels convert | tar -x -C /tmp/old
    (cd /tmp/old && PYTHONPATH=$PWD python /path/to/tools/same_results.py /tmp/old.npz)
    python tools/same_results.py /tmp/new.npz
    python tools/same_results.py --compare /tmp/old.npz /tmp/new.npz
"""

import sys
from pathlib import Path

import numpy as np

CHECKPOINT = Path(__file__).resolve().parent.parent / "ditfa_jax" / "testbed" / "checkpoint"


def run(out: str) -> None:
    import ditfa_jax
    from ditfa_jax.testbed import world
    from ditfa_jax.testbed.pipeline import TestbedPipeline

    pipe = TestbedPipeline.from_pretrained(CHECKPOINT)
    calibration = world.captions(world.sample_scenes(np.random.default_rng(1), 3))
    result = pipe.calibrate(calibration, delta=0.2, num_steps=6, progress=False)
    plan = getattr(result, "plan", result)  # older versions returned the plan itself
    captions = world.captions(world.sample_scenes(np.random.default_rng(0), 3, split="heldout"))
    np.savez(out, head_window=plan.head_window, kept=plan.flops_kept_fraction(),
             dense=pipe(captions, seeds=0, num_steps=6), compressed=pipe(captions, seeds=0, num_steps=6, plan=plan))
    print(f"{ditfa_jax.__file__}: attention FLOPs kept {plan.flops_kept_fraction():.4f} -> {out}")


def compare(a: str, b: str) -> int:
    x, y = np.load(a), np.load(b)
    same = {k: np.array_equal(x[k], y[k]) for k in x.files}
    print(", ".join(f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in same.items()))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    run(sys.argv[1])
