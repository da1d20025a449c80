"""Meshes, logical-axis rules, and placing state and batches on devices.

Parameters and activations carry logical axis names (see llmjax.models.layers). One
table per strategy maps those names to the mesh axes `data`, `fsdp`, `sequence` and
`tensor`:

    dp       parameters replicated, batch split over data x fsdp
    fsdp     parameters split along `embed` over fsdp (ZeRO-3 style)
    tp       heads / kv_heads / mlp / vocab split over tensor (Megatron style)
    fsdp+tp  both (the default; with an axis of size 1 it reduces to the others)

Every preset also splits activations along their length over `sequence` (sequence or
context parallelism, for long sequences): each device computes the queries of its slice
of the sequence against keys and values gathered whole (llmjax.models.layers.attention).
Parameters are replicated over `sequence`, as over `data`. With `sequence` = 1 (the
default) nothing changes.
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

_BATCH = ("act_batch", ("data", "fsdp"))
_SEQUENCE = ("act_length", "sequence")
_FSDP = (("embed", "fsdp"),)
_TP = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
       ("act_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"))
RULE_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    "dp": (_BATCH, _SEQUENCE),
    "fsdp": (_BATCH, _SEQUENCE, *_FSDP),
    "tp": (_BATCH, _SEQUENCE, *_TP),
    "fsdp+tp": (_BATCH, _SEQUENCE, *_FSDP, *_TP),
}


def mesh_axes(target: str | Sequence[str] | None) -> tuple[str, ...]:
    """A rule target or PartitionSpec entry (None, one mesh axis, or several) as a tuple."""
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def rules_axes(rules: Sequence[tuple[str, Any]]) -> set[str]:
    """The mesh axes that `rules` map some logical axis onto."""
    return {axis for _, target in rules for axis in mesh_axes(target)}


def logical_axis_rules(name: str) -> tuple[tuple[str, Any], ...]:
    if name not in RULE_PRESETS:
        raise ValueError(f"config.mesh.rules={name!r}: choose one of {sorted(RULE_PRESETS)}")
    return RULE_PRESETS[name]


def _resolve_degrees(degrees: Sequence[int], total: int, what: str) -> list[int]:
    """Replace a single -1 by whatever makes the product equal `total`."""
    degrees = list(degrees)
    if degrees.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one {what} degree may be -1, got {degrees}")
    known = math.prod(d for d in degrees if d != -1)
    if any(d == 0 or d < -1 for d in degrees) or total % known:
        raise ValueError(f"config.mesh {what} degrees {degrees} do not divide {total} devices")
    if -1 in degrees:
        degrees[degrees.index(-1)] = total // known
    if math.prod(degrees) != total:
        raise ValueError(f"config.mesh {what} degrees {dict(zip(MESH_AXES, degrees))} use "
                         f"{math.prod(degrees)} devices but {total} are there; set one to -1")
    return degrees


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The device mesh from `config.mesh` (ICI degrees `data`, `fsdp`, `sequence`,
    `tensor`, -1 = the rest; DCN degrees `dcn_data` ... `dcn_tensor` across slices)."""
    devices = list(devices if devices is not None else jax.devices())
    dcn = [int(mesh_cfg.get(f"dcn_{axis}", 1)) for axis in MESH_AXES]
    num_slices = math.prod(dcn)
    if len(devices) % num_slices:
        raise ValueError(f"config.mesh: {len(devices)} devices do not split into "
                         f"{num_slices} slices (dcn degrees {dcn})")
    ici = _resolve_degrees([int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES],
                           len(devices) // num_slices, "ICI")
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    elif devices[0].platform == "cpu":
        grid = np.array(devices).reshape(ici)
    else:
        grid = mesh_utils.create_device_mesh(ici, devices)
    # Auto axes: the compiler propagates shardings and with_sharding_constraint works.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def placement(mesh: Mesh | None = None, rules: str | Sequence[Any] = "fsdp"
              ) -> tuple[Mesh, Sequence[tuple[str, Any]]]:
    """The mesh (default: every device on the fsdp axis) and logical-axis rules (a preset
    name or a rules table) that a model loaded outside a training run is placed with."""
    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    return mesh, logical_axis_rules(rules) if isinstance(rules, str) else tuple(rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Mesh and rules in scope, so activation constraints in the model take effect."""
    with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
        yield


def mesh_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]], logical: Sequence[str | None],
                  shape: Sequence[int]) -> NamedSharding:
    """NamedSharding for an array of `shape` whose dims have logical names `logical`.

    A mesh axis that does not divide its dimension is dropped (that dimension is
    replicated) rather than failing: e.g. 8 KV heads on a tensor axis of 16.
    """
    spec = linen.logical_to_mesh_axes(tuple(logical), rules)
    dims = []
    for size, axes in zip(shape, spec):
        kept = tuple(a for a in mesh_axes(axes) if mesh.shape[a] > 1)
        while kept and size % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        dims.append(kept[0] if len(kept) == 1 else (kept or None))
    return NamedSharding(mesh, P(*dims))


def param_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Shardings for an nnx.State of parameters, as a pure dict matching `to_pure_dict()`."""
    from flax import nnx

    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
    shapes = nnx.to_pure_dict(jax.tree.map(lambda x: x.shape, abstract_state))
    return jax.tree.map(lambda spec, shape: mesh_sharding(mesh, rules, spec, shape),
                        logical, shapes, is_leaf=lambda x: isinstance(x, P))


def place_model(model: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """An nnx model with each parameter moved to its sharding under `rules` on `mesh`."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    placed = jax.device_put(nnx.to_pure_dict(state), param_shardings(state, mesh, rules))
    nnx.replace_by_pure_dict(state, placed)
    return nnx.merge(graphdef, state)


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def like_params(tree: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree whose leaves mirror parameters (optimizer moments, gradients).

    A leaf whose key path ends with a parameter's path and has its shape gets that
    parameter's sharding; anything else (counts, factored second moments) is replicated.
    """
    by_path = {}
    for (path, sharding), leaf in zip(jax.tree_util.tree_leaves_with_path(params_shardings),
                                      jax.tree.leaves(params)):
        by_path[_path_key(path)] = (sharding, leaf.shape)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit and hit[1] == getattr(leaf, "shape", None):
                return hit[0]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]],
                   global_batch_size: int | None = None) -> NamedSharding:
    """Sharding of a [batch, length] input array (checked against the batch size if given).

    Also where the mesh meets the rules: a mesh axis of size > 1 that no rule uses would
    have its devices repeat each other's work, so it is refused here.
    """
    used = rules_axes(rules)
    for axis, size in mesh.shape.items():
        if size > 1 and axis not in used:
            names = sorted(name for name, preset in RULE_PRESETS.items()
                           if axis in rules_axes(preset))
            raise ValueError(f"config.mesh.{axis}={size} but the rules map nothing onto it "
                             f"(its devices would all do the same work); choose "
                             f"config.mesh.rules from {names} or set config.mesh.{axis}=1")
    spec = linen.logical_to_mesh_axes(("act_batch", None), rules)
    sharding = NamedSharding(mesh, spec)
    if global_batch_size is not None:
        shards = math.prod(mesh.shape[a] for a in mesh_axes(spec[0]))
        if global_batch_size % shards:
            raise ValueError(f"config.global_batch_size={global_batch_size} must be a multiple "
                             f"of the {shards} batch shards of mesh {dict(mesh.shape)}")
    # Each process feeds its own devices' rows, so the devices that share rows (a
    # sequence x tensor group) must belong to one process.
    owners: dict[Any, set[int]] = {}
    for device, index in sharding.devices_indices_map((mesh.size, 1)).items():
        owners.setdefault(index[0].indices(mesh.size), set()).add(device.process_index)
    if any(len(processes) > 1 for processes in owners.values()):
        raise ValueError(f"config.mesh {dict(mesh.shape)}: the devices that share batch rows "
                         f"(the sequence x tensor axes) span several processes; keep "
                         f"sequence x tensor within the devices of one host")
    return sharding


def rank_sharding(sharding: NamedSharding, ndim: int) -> NamedSharding:
    """The batch sharding `sharding` for an array of `ndim` dims (e.g. 1 for [batch])."""
    spec = tuple(sharding.spec) + (None,) * max(ndim - len(sharding.spec), 0)
    return NamedSharding(sharding.mesh, P(*spec[:ndim]))


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding,
                 global_batch_size: int) -> dict[str, jax.Array]:
    """Process-local rows -> global jax.Arrays placed on the mesh ([batch] arrays, such as
    classification labels, are split along the batch as the [batch, length] ones are)."""
    def place(x):
        return jax.make_array_from_process_local_data(
            rank_sharding(sharding, x.ndim), x, (global_batch_size, *x.shape[1:]))
    return {k: place(v) for k, v in local_batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of `x` as a numpy array. With several processes every process must call
    this (a collective gather) for arrays they do not all hold."""
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def addressable_bytes(tree: Any) -> int:
    """Bytes of `tree` held on the first local device (what one device must store)."""
    device = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.nbytes
    return total
