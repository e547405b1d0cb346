"""Multi-device sampling: a mesh of a data axis and a head axis, head-parallel attention, plan-aware balancing.

* The **data axis** splits the batch the model sees (prompts, and with CFG the two halves [uncond; cond]).
* The **head axis** runs attention Ulysses-style: outside attention every activation is split over tokens
  (sequence-parallel linears, weights replicated); attention itself runs under `jax.shard_map` on a slice of the
  heads, so XLA's partitioner turns the token split into a head split with one all-to-all in (q, k, v and the
  plan's cache) and one out. A stream whose token count the head axis does not divide (SD3's 333 text tokens) is
  kept whole on the head axis instead (same result, less parallel work outside attention).
* **Balancing**: per (step, layer) the plan's heads cost different time (full, arrow, cached), so a fixed split of
  heads over devices leaves some idle. `balance_heads` chooses, from the kernel's tile counts, a permutation of the
  heads that evens out the devices' work; it is scanned as data and applied where the activations are still split
  over tokens (a local gather, no communication).

A one-device mesh, or none, is today's single-device path.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, HEADS = "data", "heads"

__all__ = ["DATA", "HEADS", "make_mesh", "parse_devices", "check_mesh", "is_parallel", "replicate", "shard_weights",
           "on_mesh", "batch_spec", "split_batch", "split_tokens", "head_parallel", "balance_heads", "device_loads",
           "imbalance", "balance_report", "plan_head_costs"]


def make_mesh(data: int = 1, heads: int = 1, devices=None) -> Mesh:
    """A (data, heads) mesh over the first data * heads of `devices` (default: `jax.devices()`), all of one kind."""
    for name, n in (("data", data), ("heads", heads)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"mesh {name} axis: expected an integer >= 1, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    if data * heads > len(devices):
        raise ValueError(f"a mesh of data {data} x heads {heads} needs {data * heads} devices; "
                         f"{len(devices)} are available ({_kinds(devices)})")
    devices = devices[:data * heads]
    _check_one_kind(devices)
    return Mesh(np.array(devices).reshape(data, heads), (DATA, HEADS))


def _kinds(devices) -> str:
    """"2 x NVIDIA H200 (gpu), ...": how many devices of each kind."""
    return ", ".join(f"{n} x {kind}" for kind, n in Counter(f"{d.device_kind} ({d.platform})" for d in devices).items())


def _check_one_kind(devices) -> None:
    if len({(d.platform, d.device_kind) for d in devices}) > 1:
        raise ValueError(f"a mesh's devices must all be of one kind; got {_kinds(devices)}")


def parse_devices(text: str) -> tuple[int, int]:
    """The CLI's `--devices`: "N" (N devices on the head axis) or "DxH" (data axis D, head axis H)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", text)
    if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
        raise ValueError(f"--devices {text!r}: expected N (devices on the head axis) or DxH (data x heads), "
                         "e.g. 4 or 2x4")
    return (1, int(match[1])) if match[2] is None else (int(match[1]), int(match[2]))


def check_mesh(mesh: Mesh, config, batch: int) -> Mesh | None:
    """Refuse a mesh the run cannot be split over: its axes, a head count the head axis does not divide, a model
    batch (with CFG: twice the images) the data axis does not divide, devices of more than one kind. Returns the
    mesh, or None for a one-device mesh (which runs the single-device program)."""
    if tuple(mesh.axis_names) != (DATA, HEADS):
        raise ValueError(f"mesh axes {tuple(mesh.axis_names)}: expected ({DATA!r}, {HEADS!r}) (ditfa_jax.sharding."
                         "make_mesh)")
    _check_one_kind(list(mesh.devices.flat))
    heads, shards = config.num_attention_heads, mesh.shape[HEADS]
    if heads % shards:
        divisors = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ValueError(f"mesh head axis {shards}: the model has {heads} attention heads, which {shards} does not "
                         f"divide; expected one of {divisors}")
    if batch % mesh.shape[DATA]:
        raise ValueError(f"mesh data axis {mesh.shape[DATA]}: the model sees a batch of {batch} (images x 2 with "
                         f"CFG), which it does not divide; use a batch that is a multiple of it or a smaller axis")
    return mesh if is_parallel(mesh) else None


def is_parallel(mesh: Mesh | None) -> bool:
    """Whether `mesh` spans more than one device (a one-device mesh runs the single-device program)."""
    return mesh is not None and mesh.size > 1


def replicate(tree, mesh: Mesh):
    """Every array of `tree` copied to each device of `mesh` (a no-op for those already there)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_weights(state, mesh: Mesh):
    """The weights split over all devices of `mesh` along their last axis where the device count divides it
    (matrices and stacked layers; XLA gathers each where it is used), the rest replicated: for a model whose
    weights do not fit one device."""
    def place(a):
        spec = P(*([None] * (a.ndim - 1)), (DATA, HEADS)) if a.ndim >= 2 and a.shape[-1] % mesh.size == 0 else P()
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(place, state)


def on_mesh(tree, mesh: Mesh) -> bool:
    """Whether every array of `tree` is already placed on `mesh` (replicated or split)."""
    return all(isinstance(getattr(a, "sharding", None), NamedSharding) and a.sharding.mesh == mesh
               for a in jax.tree_util.tree_leaves(tree))


def batch_spec(rows: int, mesh: Mesh) -> P:
    """The leading (batch) axis of `rows` split over the data axis, or replicated where the axis does not divide
    it."""
    return P(DATA) if rows % mesh.shape[DATA] == 0 else P()


def split_batch(tree, mesh: Mesh):
    """Every array of `tree` placed on `mesh` with its leading (batch) axis split over the data axis (`batch_spec`;
    scalars replicated)."""
    def place(a):
        spec = batch_spec(np.shape(a)[0], mesh) if np.ndim(a) >= 1 else P()
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(place, tree)


def split_tokens(tree, mesh: Mesh | None, batch_axis: int = 0):
    """Constrain activations [..., batch, tokens, ...] (batch at `batch_axis`) to the data split of the batch and
    the head axis's split of the tokens (Ulysses' layout outside attention); a token count the head axis does not
    divide stays whole."""
    if not is_parallel(mesh):
        return tree

    def constrain(a):
        if a.ndim < batch_axis + 2:
            return a
        tokens = HEADS if a.shape[batch_axis + 1] % mesh.shape[HEADS] == 0 else None
        spec = P(*([None] * batch_axis), DATA, tokens, *([None] * (a.ndim - batch_axis - 2)))
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(constrain, tree)


def head_parallel(attend, mesh: Mesh, q, k, v, head_window=None, cache=None, head_order=None):
    """`attend(q, k, v, head_window, cache)` ([B, T, H, D], single-device) run on each device's slice of the batch
    and of the heads; `head_order` [H] (a permutation, or None) says which heads sit together on a device: the heads
    are gathered in that order before the split and the output put back in the model's order after it."""
    if head_order is not None:
        q, k, v = (jnp.take(a, head_order, axis=2) for a in (q, k, v))
        head_window = jnp.take(head_window, head_order)
        cache = jnp.take(cache, head_order, axis=2)
    rows = P(DATA, None, HEADS, None)
    if head_window is None:
        out = jax.shard_map(lambda q, k, v: attend(q, k, v, None, None), mesh=mesh, in_specs=(rows,) * 3,
                            out_specs=rows, check_vma=False)(q, k, v)
    else:
        out = jax.shard_map(attend, mesh=mesh, in_specs=(rows, rows, rows, P(HEADS), rows), out_specs=rows,
                            check_vma=False)(q, k, v, head_window, cache)
    out = split_tokens(out, mesh)  # back to the token split first: the gather below is then local
    if head_order is not None:
        out = jnp.take(out, jnp.argsort(head_order), axis=2)
    return out


# ---- plan-aware balancing (host, numpy) ----

def plan_head_costs(plan, layout, head_dim: int) -> np.ndarray:
    """Per (step, layer, head) the kernel's computed tiles of the plan's head windows (0 for a cached head; an FP8
    head counted as full), the cost model of `pallas_kernels.plan_cost`."""
    import pallas_kernels
    from ditfa_jax.methods import flop_windows

    cost = pallas_kernels.plan_cost(flop_windows(plan.head_window), batch=1, tokens=layout.tokens,
                                    text_len=layout.text_len, text_first=layout.text_first, head_dim=head_dim,
                                    band=tuple(plan.band))
    return cost.tiles.astype(np.float64)


def balance_heads(costs, shards: int) -> np.ndarray:
    """A permutation of the head axis per leading index (e.g. [steps, layers, H] -> int32 of that shape) that
    evens out the cost of the `shards` equal blocks of consecutive positions (one block a device).

    Heads are dealt in decreasing cost, each to the device with the least cost so far that still has a free place
    (longest processing time first, with equal counts), and the model's own order is kept where that deal is no
    better; position i of the result names the head placed there."""
    costs = np.asarray(costs, np.float64)
    heads = costs.shape[-1]
    if heads % shards:
        raise ValueError(f"balance_heads: {heads} heads do not split into {shards} equal blocks")
    per = heads // shards
    flat = costs.reshape(-1, heads)
    order = np.empty(flat.shape, np.int32)
    for row, c in enumerate(flat):
        load, slots = np.zeros(shards), [[] for _ in range(shards)]
        for head in np.argsort(-c, kind="stable"):
            open_ = [d for d in range(shards) if len(slots[d]) < per]
            device = min(open_, key=lambda d: (load[d], d))
            slots[device].append(head)
            load[device] += c[head]
        dealt = np.concatenate([sorted(s) for s in slots])
        busiest = lambda o: c[o].reshape(shards, per).sum(-1).max()  # noqa: E731
        order[row] = dealt if busiest(dealt) < busiest(np.arange(heads)) else np.arange(heads)
    return order.reshape(costs.shape)


def device_loads(costs, order, shards: int) -> np.ndarray:
    """Per leading index, each device's summed cost [..., shards] when the heads sit in `order` (None: model
    order)."""
    costs = np.asarray(costs, np.float64)
    placed = costs if order is None else np.take_along_axis(costs, np.asarray(order), axis=-1)
    return placed.reshape(*costs.shape[:-1], shards, -1).sum(-1)


def imbalance(costs, order, shards: int) -> float:
    """The head axis's attention time over its ideal: the sum over (step, layer) of the busiest device's cost,
    divided by the sum of the mean device cost (1.0 is perfect balance; each layer waits for its slowest device)."""
    loads = device_loads(costs, order, shards).reshape(-1, shards)
    mean = loads.mean(-1).sum()
    return float(loads.max(-1).sum() / mean) if mean > 0 else 1.0


def balance_report(costs, shards: int) -> dict:
    """The predicted imbalance (`imbalance`) of per-head costs over `shards` devices in the model's head order and
    in `balance_heads`' order."""
    return dict(head_shards=shards, predicted_imbalance=round(imbalance(costs, None, shards), 4),
                predicted_imbalance_balanced=round(imbalance(costs, balance_heads(costs, shards), shards), 4))
