"""Sharded conversion on 8 simulated CPU devices (a subprocess: the device count is fixed when
jax starts): values equal the unsharded load, each array has the requested NamedSharding, and
each device's block is read on its own (no read covers a whole sharded tensor)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import sys
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax_registry.convert import from_torch
from flax_registry.io import save_safetensors

assert jax.device_count() == 8, jax.devices()

class Net(nn.Module):
    def setup(self):
        self.emb = nn.Embed(16, 8)
        self.fc = nn.Dense(16)
        self.conv = nn.Conv(8, (3, 3), padding=1)
        self.deconv = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)))
        self.bn = nn.BatchNorm(use_running_average=True)
        self.attn = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=8, out_features=8)
    def __call__(self, ids, img):
        h = self.emb(ids)
        a = self.attn(h)
        y = self.bn(self.deconv(self.conv(img)))
        return self.fc(a), y

ids, img = jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 4, 4, 4))
model = Net()
abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, img))
rng = np.random.default_rng(0)
# The torch-side checkpoint: every tensor random, in torch layout.
from flax_registry.convert._plan import make_plan
plan = make_plan(model, example_inputs=(ids, img))
sd = {k: rng.standard_normal(e.torch_shape).astype(np.float32) for k, e in plan.entries.items()}
sd["bn.num_batches_tracked"] = np.array(3, np.int64)
path = sys.argv[1] + "/model.safetensors"
save_safetensors(sd, path)

reads = []
from flax_registry.convert._source import Source
original = Source.read_slice
def counting(self, key, index):
    out = original(self, key, index)
    reads.append((key, out.size))
    return out
Source.read_slice = counting

reference, _ = from_torch(model, path, example_inputs=(ids, img))
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
specs = {
    "emb.weight": P("data", "model"),
    "fc.weight": P("model", "data"),                     # flax kernel (in=8, out=16)
    "conv.weight": P(None, None, "model", "data"),       # (3, 3, in=4, out=8)
    "deconv.weight": P("data", "model", None, None),     # (4, 4, 8, 4), spatially flipped
    "attn.in_proj_weight": P("model", "data", None),     # query/key/value (in, heads, head_dim)
    "params/attn/query/kernel": P(None, "data", "model"),  # flax path beats nothing; key wins
    "attn.in_proj_bias": P("data", "model"),             # (heads, head_dim) each
    "attn.out_proj.weight": P("data", "model", None),    # (heads, head_dim, out)
    "bn.running_mean": P("data"),
}
reads.clear()
sharded, report = from_torch(model, path, example_inputs=(ids, img), shardings=specs, mesh=mesh)
assert report.ok, report
flat_ref = dict(jax.tree_util.tree_leaves_with_path(reference))
by_where = {}
for key, e in plan.entries.items():
    for part in e.parts:
        by_where[(part.collection, *part.path)] = key
checked = 0
for path_, leaf in jax.tree_util.tree_leaves_with_path(sharded):
    where = tuple(p.key for p in path_)
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_ref[path_]), err_msg=str(where))
    spec = specs.get(by_where[where])
    if spec is not None:
        assert leaf.sharding == NamedSharding(mesh, spec), (where, leaf.sharding)
        assert len(leaf.addressable_shards) == 8
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(flat_ref[path_])[shard.index])
        checked += 1
assert checked == 12, checked  # emb, fc, conv, deconv, q/k/v kernels and biases, out, bn mean
# Each device block is read on its own: no read of a sharded tensor covers all of it.
full = {k: v.size for k, v in sd.items()}
for key in ("fc.weight", "emb.weight", "conv.weight", "deconv.weight", "attn.in_proj_weight"):
    sizes = [n for k, n in reads if k == key]
    assert sizes and max(sizes) < full[key], (key, sizes, full[key])
assert max(n for k, n in reads if k == "fc.weight") == full["fc.weight"] // 8

# Shardings carried by an abstract target give the same placement.
target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s.sharding), abstract, sharded)
again, _ = from_torch(model, path, variables=target, example_inputs=(ids, img))
for (p1, a), (p2, b) in zip(jax.tree_util.tree_leaves_with_path(again), jax.tree_util.tree_leaves_with_path(sharded)):
    assert p1 == p2 and a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b)), p1

# The checkpoint's sharding vocabulary is from_torch's: sharding_rules over torch names (globs).
import flax_registry as fr
rules = fr.checkpoint.sharding_rules(
    mesh, [("emb.weight", P("data", "model")), ("fc.*", P("model")), ("attn.*_proj_*", P("data"))]
)
ruled, _ = from_torch(model, path, example_inputs=(ids, img), shardings=rules)
placed = {}
for path_, leaf in jax.tree_util.tree_leaves_with_path(ruled):
    where = tuple(p.key for p in path_)
    placed[by_where[where]] = leaf.sharding
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_ref[path_]))
assert placed["emb.weight"] == NamedSharding(mesh, P("data", "model"))
assert placed["fc.weight"] == placed["fc.bias"] == NamedSharding(mesh, P("model"))
assert placed["attn.in_proj_weight"] == NamedSharding(mesh, P("data"))
assert placed["conv.weight"] == NamedSharding(mesh, P())  # the default: replicated
print("OK")
"""


def test_sharded_conversion_on_8_cpu_devices(tmp_path: Path) -> None:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")
