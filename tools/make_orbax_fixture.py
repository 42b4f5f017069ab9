"""Write the tiny Orbax (Flax) Gemma 2 test fixtures under tests/fixtures/orbax/ (development only).

Needs jax and orbax-checkpoint (``pip install -e '.[dev-orbax]'``) plus transformers; the tests read
the output with tensorstore alone. Each fixture is a random ``transformers.Gemma2ForCausalLM`` in
bfloat16, saved twice:

    <fixture>/hf/                      the source model (``save_pretrained``: config.json, model.safetensors)
    <fixture>/kaggle/tokenizer.model   the layout of a Kaggle Flax archive: tokenizer + checkpoint dir
    <fixture>/kaggle/<checkpoint>/     Orbax PyTree checkpoint (_METADATA, manifest.ocdbt, d/, ...)

The parameters use the tree google-deepmind/gemma releases and saves (``gemma/params.py``:
``{'transformer/layer_0/attn/q_einsum': {'w': …}}``, saved with ``orbax.checkpoint.PyTreeCheckpointer``),
with the embedding padded by extra rows as the released 256000 → 256128. One fixture instead uses the
nested tree of the ``gm`` library, K == N (``qkv_einsum``) and the older one-zarr-directory-per-array
layout (``use_ocdbt=False``).

Every HF → Flax layout below is checked against google-deepmind/gemma's einsum equations
(``modules.py``) on random inputs, so the fixtures test the reader's transforms rather than mirror them.

Usage: python tools/make_orbax_fixture.py [--out tests/fixtures/orbax]
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
from reference.config import Gemma2Config


@dataclass(frozen=True)
class Fixture:
    config: Gemma2Config
    rows: int
    """Embedding rows stored (vocab_size + padding)."""
    gating_transposed: bool
    """[2, I, H] like the released 9B/27B, else [2, H, I] like the released 2B."""
    ocdbt: bool = True
    nested: bool = False
    """The gm library's nested tree instead of the released semi-flat one."""
    tokenizer: bool = True


FIXTURES = {
    # 2B-like: gating [2, H, I], query_pre_attn_scalar = head_dim, small sliding window (needs its config.json)
    "gemma2_2b_layout": Fixture(Gemma2Config(
        vocab_size=448, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=12, query_pre_attn_scalar=12, sliding_window=4), rows=512,
        gating_transposed=False),
    # 27B-like: gating [2, I, H], head_dim != H/N, query_pre_attn_scalar = H/N, every other value the default
    "gemma2_27b_layout": Fixture(Gemma2Config(
        vocab_size=448, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=4), rows=512, gating_transposed=True),
    # MHA (qkv_einsum), nested gm tree, one zarr directory per array, no tokenizer, unpadded vocabulary
    "mha_nested_zarr": Fixture(Gemma2Config(
        vocab_size=96, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=3), rows=96,
        gating_transposed=False, ocdbt=False, nested=True, tokenizer=False),
}


# ---- the source model ------------------------------------------------------------------------

def make_model(cfg: Gemma2Config, seed: int):
    """A random bfloat16 transformers Gemma2ForCausalLM with non-zero norms and unit-gain layers."""
    import transformers

    torch.manual_seed(seed)
    hc = transformers.Gemma2Config(**cfg.to_hf_dict())
    hc._attn_implementation = "eager"
    model = transformers.Gemma2ForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif name.endswith("proj.weight"):
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn_like(p))
    return model.to(torch.bfloat16)


# ---- HF → Flax layouts (google-deepmind/gemma modules.py; letters as there: D embed, H head_dim) -----

def q_kernel(w: torch.Tensor, n: int) -> torch.Tensor:
    """q/k/v_proj [N·Dh, D] → einsum kernel [N, D, Dh] for 'BTD,NDH->BTNH'."""
    return w.reshape(n, -1, w.shape[1]).permute(0, 2, 1)


NORMS = (("pre_attention_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
         ("pre_ffw_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"))


def flax_params(sd: dict[str, torch.Tensor], fx: Fixture) -> dict[str, dict[str, torch.Tensor]]:
    """The semi-flat released tree {module path: {leaf: kernel}} of an HF state dict."""
    c = fx.config
    emb = sd["model.embed_tokens.weight"]
    pad = torch.randn(fx.rows - c.vocab_size, c.hidden_size, generator=torch.Generator().manual_seed(7))
    tree = {"transformer/embedder": {"input_embedding": torch.cat([emb, pad.to(emb.dtype)])},
            "transformer/final_norm": {"scale": sd["model.norm.weight"]}}
    for i in range(c.num_hidden_layers):
        p, f = f"model.layers.{i}.", f"transformer/layer_{i}/"
        q, k, v = (sd[f"{p}self_attn.{x}_proj.weight"] for x in "qkv")
        n, kv = c.num_attention_heads, c.num_key_value_heads
        if n == kv:
            tree[f + "attn/qkv_einsum"] = {"w": torch.stack([q_kernel(x, n) for x in (q, k, v)])}
        else:
            tree[f + "attn/q_einsum"] = {"w": q_kernel(q, n)}
            tree[f + "attn/kv_einsum"] = {"w": torch.stack([q_kernel(k, kv), q_kernel(v, kv)])}
        o = sd[p + "self_attn.o_proj.weight"]                                     # [D, N·Dh]
        tree[f + "attn/attn_vec_einsum"] = {"w": o.T.reshape(n, c.head_dim, c.hidden_size)}
        gate, up = sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]  # [I, D]
        branches = (gate, up) if fx.gating_transposed else (gate.T, up.T)
        tree[f + "mlp/gating_einsum"] = {"w": torch.stack(branches)}
        tree[f + "mlp/linear"] = {"w": sd[p + "mlp.down_proj.weight"].T}        # [I, D]
        for flax, hf in NORMS:
            tree[f + flax] = {"scale": sd[f"{p}{hf}.weight"]}
    return {k: {leaf: t.contiguous() for leaf, t in v.items()} for k, v in tree.items()}


def check_einsums(tree: dict, sd: dict[str, torch.Tensor], fx: Fixture) -> None:
    """Each kernel, applied with google-deepmind/gemma's einsum, equals the HF linear map."""
    c, f32 = fx.config, (lambda t: t.float().numpy())
    x = np.random.default_rng(0).standard_normal((2, 3, c.hidden_size)).astype(np.float32)
    enc = np.random.default_rng(1).standard_normal((2, 3, c.num_attention_heads, c.head_dim)).astype(np.float32)
    lin = (lambda w, a: a @ f32(w).T)
    for i in range(c.num_hidden_layers):
        p, f = f"model.layers.{i}.", f"transformer/layer_{i}/"
        ref = {x_: lin(sd[f"{p}self_attn.{x_}_proj.weight"], x) for x_ in "qkv"}
        if f + "attn/qkv_einsum" in tree:
            qkv = np.einsum("BTD,SNDH->SBTNH", x, f32(tree[f + "attn/qkv_einsum"]["w"]))
            got = dict(zip("qkv", qkv))
        else:
            kv = np.einsum("BSD,CKDH->CBSKH", x, f32(tree[f + "attn/kv_einsum"]["w"]))
            got = {"q": np.einsum("BTD,NDH->BTNH", x, f32(tree[f + "attn/q_einsum"]["w"])), "k": kv[0], "v": kv[1]}
        for name in "qkv":
            _close(got[name].reshape(2, 3, -1), ref[name], f"layer {i} {name}")
        out = np.einsum("BTNH,NHD->BTD", enc, f32(tree[f + "attn/attn_vec_einsum"]["w"]))
        _close(out, lin(sd[p + "self_attn.o_proj.weight"], enc.reshape(2, 3, -1)), f"layer {i} o")
        eq = "...F,NHF->...NH" if fx.gating_transposed else "...F,NFH->...NH"
        gate = np.einsum(eq, x, f32(tree[f + "mlp/gating_einsum"]["w"]))
        _close(gate[..., 0, :], lin(sd[p + "mlp.gate_proj.weight"], x), f"layer {i} gate")
        _close(gate[..., 1, :], lin(sd[p + "mlp.up_proj.weight"], x), f"layer {i} up")
        a = gate[..., 0, :]
        _close(np.einsum("...H,HF->...F", a, f32(tree[f + "mlp/linear"]["w"])),
               lin(sd[p + "mlp.down_proj.weight"], a), f"layer {i} down")


def _close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if not np.allclose(a, b, rtol=1e-5, atol=1e-5):
        raise SystemExit(f"{what}: Flax kernel disagrees with the HF weight (max |Δ| {np.abs(a - b).max()})")


def nested_tree(tree: dict) -> dict:
    """The gm library's nested tree: no 'transformer' root, MLP kernels without the 'w' level."""
    out: dict = {}
    for path, leaves in tree.items():
        *mods, last = path.removeprefix("transformer/").split("/")
        node = out
        for m in mods:
            node = node.setdefault(m, {})
        node[last] = leaves["w"] if path.endswith(("mlp/gating_einsum", "mlp/linear")) else leaves
    return out


# ---- saving ----------------------------------------------------------------------------------

def save_orbax(tree: dict, path: Path, ocdbt: bool) -> None:
    """Save as google-deepmind/gemma does (PyTreeCheckpointer), as jax bfloat16 arrays; check by restoring."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    def to_jax(t: torch.Tensor):
        return jnp.asarray(t.view(torch.uint16).numpy().view(jnp.bfloat16))

    params = jax.tree_util.tree_map(to_jax, tree)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)
    ocp.Checkpointer(handler).save(path.resolve(), args=ocp.args.PyTreeSave(params))
    back = ocp.PyTreeCheckpointer().restore(path.resolve())
    same = jax.tree_util.tree_map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), params, back)
    if not all(jax.tree_util.tree_leaves(same)):
        raise SystemExit(f"{path}: restored arrays differ from the saved ones")
    (path / "commit_success.txt").unlink(missing_ok=True)  # a local-filesystem marker naming the absolute path


def make_fixture(name: str, fx: Fixture, out: Path, seed: int) -> None:
    root = out / name
    shutil.rmtree(root, ignore_errors=True)
    model = make_model(fx.config, seed)
    model.save_pretrained(root / "hf")
    sd = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tree = flax_params(sd, fx)
    check_einsums(tree, sd, fx)
    if fx.tokenizer:
        (root / "kaggle").mkdir()
        make_tiny_spm(root / "kaggle" / "tokenizer.model", fx.config.vocab_size)
        ckpt = root / "kaggle" / "gemma2-tiny"
    else:
        ckpt = root / "ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_orbax(nested_tree(tree) if fx.nested else tree, ckpt, fx.ocdbt)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"{root}: {size / 1024:.0f} KiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/orbax")
    args = ap.parse_args()
    for seed, (name, fx) in enumerate(FIXTURES.items()):
        make_fixture(name, fx, args.out, seed)


if __name__ == "__main__":
    main()
