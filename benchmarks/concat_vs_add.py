"""The paper's Table 1 on this machine: GhostNet 1.0x's 32 concatenations against adds of the same shape.

The shapes come from GhostNet 1.0x itself (224x224): forward hooks on its 32 Ghost modules record the two
halves each one concatenates (``[N, C/2, H, W]`` twice -> ``[N, C, H, W]``).  For every batch size the 32 ops
are run back to back, as one small graph of just those ops, in PyTorch and in ONNX Runtime (one thread):

* ``concat``: ``cat([a, b], dim=1)`` of the two real halves;
* ``add``: ``a + b`` with ``a``, ``b`` and the result all of the concatenation's output shape (what the paper
  swaps in: "these two operators operate on tensors with exactly the same shape");
* ``add_halves``: ``a + b`` of the two halves themselves (output ``[N, C/2, H, W]``), for reference;
* ``overhead``: 32 adds of one-element tensors: the per-op dispatch cost included in every total above;
* torch only, ``concat_nhwc`` / ``add_nhwc``: ``concat`` and ``add`` on channels-last tensors, the layout the
  paper's argument is about (in NHWC a channel concatenation copies ``C/2``-float runs, not whole planes).

Outputs are preallocated and reused (``out=`` in torch, I/O binding in ORT), so the numbers are the ops, not
the allocator.  All variants of one runtime and batch size are timed interleaved; totals are medians over
the repeats.  Writes ``concat_vs_add.json`` and ``concat_vs_add.png``.
"""

from __future__ import annotations

from pathlib import Path

import _common as C

# Table 1 of the paper (ARM phone, MNN, ms): accumulated runtime of the 32 operators.
PAPER = {"batch": [1, 2, 8, 32], "concat_ms": [5.2, 13.2, 64.24, 292.2], "add_ms": [2.6, 6.7, 34.0, 149.8]}
VARIANTS = ("concat", "add", "add_halves", "overhead")


def ghost_shapes(seed: int = 0) -> list[dict[str, int]]:
    """(C1, C2, H, W) of each Ghost module's concatenation in GhostNet 1.0x at 224x224, in network order."""
    import torch

    import reparam_zoo

    torch.manual_seed(seed)
    model = reparam_zoo.create_model("ghostnet_1_0x").eval()
    shapes: list[dict[str, int]] = []

    def hook(module, inputs, output):
        x1 = module.primary_conv(inputs[0])
        x2 = module.cheap_operation(x1)
        _, c1, h, w = x1.shape
        shapes.append({"c1": int(c1), "c2": int(x2.shape[1]), "h": int(h), "w": int(w), "out": int(output.shape[1])})

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, reparam_zoo.GhostModule)]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return shapes


def _arrays(shapes, n: int, rng):
    """numpy buffers shared by both runtimes: inputs and reusable outputs of each variant."""
    import numpy as np

    def rand(*s):
        return rng.standard_normal(s, dtype=np.float32)

    halves = [(rand(n, s["c1"], s["h"], s["w"]), rand(n, s["c2"], s["h"], s["w"])) for s in shapes]
    full = [(rand(n, s["c1"] + s["c2"], s["h"], s["w"]), rand(n, s["c1"] + s["c2"], s["h"], s["w"])) for s in shapes]
    out_full = [np.empty((n, s["c1"] + s["c2"], s["h"], s["w"]), np.float32) for s in shapes]
    out_half = [np.empty((n, s["c1"], s["h"], s["w"]), np.float32) for s in shapes]
    tiny = [(rand(1, 1, 1, 1), rand(1, 1, 1, 1)) for _ in shapes]
    out_tiny = [np.empty((1, 1, 1, 1), np.float32) for _ in shapes]
    return {"concat": (halves, out_full), "add": (full, out_full), "add_halves": (halves, out_half),
            "overhead": (tiny, out_tiny)}


def _torch_fns(bufs, nhwc: bool = True):
    import torch

    from reparam.measure import torch_runner

    class Ops(torch.nn.Module):
        def __init__(self, concat: bool) -> None:
            super().__init__()
            self.concat = concat

        def forward(self, pairs, outs):
            for (a, b), o in zip(pairs, outs):
                if self.concat:
                    torch.cat((a, b), 1, out=o)
                else:
                    torch.add(a, b, out=o)

    fns = {}
    for k, (pairs, outs) in bufs.items():
        t_pairs = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in pairs]
        t_outs = [torch.from_numpy(o) for o in outs]
        fns[k] = torch_runner(Ops(k == "concat"), (t_pairs, t_outs), threads=1)
        if nhwc and k in ("concat", "add"):
            # the same ops on channels-last (NHWC) tensors: the layout the paper blames for costly concatenation
            cl = torch.channels_last
            n_pairs = [(a.contiguous(memory_format=cl), b.contiguous(memory_format=cl)) for a, b in t_pairs]
            n_outs = [o.contiguous(memory_format=cl) for o in t_outs]
            fns[f"{k}_nhwc"] = torch_runner(Ops(k == "concat"), (n_pairs, n_outs), threads=1)
            fns[f"{k}_nhwc"]()
            for (a, b), o in zip(n_pairs, n_outs):
                want = torch.cat((a, b), 1) if k == "concat" else a + b
                if not (o.is_contiguous(memory_format=cl) and torch.equal(o, want)):
                    raise RuntimeError(f"{k} on channels-last tensors did not produce the expected output")
    return fns


def _ort_fns(bufs):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from reparam.measure import ort_session

    fns = {}
    for k, (pairs, outs) in bufs.items():
        nodes, inputs, outputs = [], [], []
        for i, ((a, b), o) in enumerate(zip(pairs, outs)):
            inputs += [helper.make_tensor_value_info(f"a{i}", TensorProto.FLOAT, a.shape),
                       helper.make_tensor_value_info(f"b{i}", TensorProto.FLOAT, b.shape)]
            outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, o.shape))
            if k == "concat":
                nodes.append(helper.make_node("Concat", [f"a{i}", f"b{i}"], [f"y{i}"], axis=1))
            else:
                nodes.append(helper.make_node("Add", [f"a{i}", f"b{i}"], [f"y{i}"]))
        graph = helper.make_graph(nodes, k, inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        sess = ort_session(model, threads=1, optimize="basic")
        binding = sess.io_binding()
        for i, ((a, b), o) in enumerate(zip(pairs, outs)):
            binding.bind_ortvalue_input(f"a{i}", ort.OrtValue.ortvalue_from_numpy(a))
            binding.bind_ortvalue_input(f"b{i}", ort.OrtValue.ortvalue_from_numpy(b))
            binding.bind_ortvalue_output(f"y{i}", ort.OrtValue.ortvalue_from_numpy(o))
        fns[k] = (lambda s=sess, bd=binding: s.run_with_iobinding(bd))
    return fns


def _check(fns, bufs) -> None:
    """The ops really run and write the bound outputs (concat and add share their output buffers)."""
    import numpy as np

    for k, ref in (("concat", lambda a, b: np.concatenate([a, b], 1)), ("add", np.add)):
        pairs, outs = bufs[k]
        for o in outs:
            o.fill(np.nan)
        fns[k]()
        for (a, b), o in zip(pairs, outs):
            if not np.array_equal(o, ref(a, b)):
                raise RuntimeError(f"{k} did not produce the expected output")


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,2,8,32; --quick: 1,8)")
    p.add_argument("--repeats", type=int, help="interleaved runs per variant (default 40, 15 at batch >= 32; "
                                               "quick 5)")
    args = p.parse_args(argv)

    import numpy as np

    from reparam.measure import environment, interleaved_medians

    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 8] if args.quick else [1, 2, 8, 32])
    shapes = ghost_shapes(args.seed)
    elems = sum((s["c1"] + s["c2"]) * s["h"] * s["w"] for s in shapes)
    C.log(f"{len(shapes)} concatenations in GhostNet 1.0x, {elems:,} output elements per image")
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in batches:
        repeats = args.repeats or (5 if args.quick else (15 if n >= 32 else 40))
        bufs = _arrays(shapes, n, rng)
        entry = {"batch": n, "repeats": repeats, "output_bytes": elems * n * 4}
        for side, make in (("torch", _torch_fns), ("onnxruntime", _ort_fns)):
            C.log(f"batch {n}: {side}, {repeats} interleaved runs per variant")
            fns = make(bufs)
            _check(fns, bufs)
            med = interleaved_medians(fns, repeats=repeats)
            ovh = med["overhead"]
            entry[side] = {
                "total_s": med,
                "ratio_concat_over_add": med["concat"] / med["add"],
                "ratio_concat_over_add_minus_overhead": (med["concat"] - ovh) / max(med["add"] - ovh, 1e-12),
                "ratio_concat_over_add_halves": med["concat"] / med["add_halves"],
            }
            if "concat_nhwc" in med:
                entry[side]["ratio_concat_over_add_nhwc"] = med["concat_nhwc"] / med["add_nhwc"]
            del fns
        del bufs
        rows.append(entry)

    paper_ratio = {b: c / a for b, c, a in zip(PAPER["batch"], PAPER["concat_ms"], PAPER["add_ms"])}
    result = {
        "benchmark": "concat_vs_add", "quick": args.quick, "environment": environment(threads=1),
        "settings": {"network": "ghostnet_1_0x", "image": 224, "batches": batches, "threads": 1,
                     "ops": len(shapes), "output_elements_per_image": elems,
                     "torch": "torch.cat(out=) / torch.add(out=) on preallocated tensors, NCHW and channels-last",
                     "onnxruntime": "one graph of 32 Concat or Add nodes, ORT_ENABLE_BASIC, I/O binding",
                     "statistic": "median seconds for all 32 ops", "seed": args.seed},
        "shapes": shapes,
        "paper_table1": {**PAPER, "ratio": [paper_ratio[b] for b in PAPER["batch"]],
                         "device": "ARM-based mobile phone, MNN"},
        "batches": rows,
    }
    path = C.write_json(args.out, "concat_vs_add", result)
    _plot(result, args.out / "concat_vs_add.png", args.quick)
    print(f"\nGhostNet 1.0x: {len(shapes)} concatenations vs adds of the same output shape, one thread "
          "(medians of the 32-op total)" + ("  [QUICK: noisy]" if args.quick else ""))
    table = []
    for r in rows:
        for side, sfx in (("torch", ""), ("torch", "_nhwc"), ("onnxruntime", "")):
            t = r[side]["total_s"]
            if f"concat{sfx}" not in t:
                continue
            table.append([f"bs={r['batch']}", side + (" NHWC" if sfx else ""), C.ms(t[f"concat{sfx}"]),
                          C.ms(t[f"add{sfx}"]), C.ms(t["add_halves"]) if not sfx else "-", C.ms(t["overhead"]),
                          f"{t[f'concat{sfx}'] / t[f'add{sfx}']:.2f}",
                          f"{paper_ratio[r['batch']]:.2f}" if r["batch"] in paper_ratio else "-"])
    C.print_table(["batch", "runtime", "concat", "add", "add halves", "overhead", "concat/add", "paper"], table)
    print(f"\nwrote {path} and {args.out / 'concat_vs_add.png'}")
    return 0


def _plot(result: dict, path: Path, quick: bool) -> None:
    plt = C.pyplot()
    rows = result["batches"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    xs = range(len(rows))
    bars = [("torch", "concat", "#2a7ab9", "torch concat"), ("torch", "add", "#9cc3e4", "torch add"),
            ("onnxruntime", "concat", "#c0504d", "ORT concat"), ("onnxruntime", "add", "#e6a5a3", "ORT add")]
    for j, (side, k, color, label) in enumerate(bars):
        ax.bar([i + (j - 1.5) * 0.2 for i in xs], [r[side]["total_s"][k] * 1e3 for r in rows], 0.2,
               color=color, label=label)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [f"bs={r['batch']}" for r in rows])
    ax.set_ylabel("ms for all 32 ops (median)")
    ax.set_title("accumulated time of GhostNet 1.0x's 32 ops", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    batches = [r["batch"] for r in rows]
    for side, key, color, label in (("torch", "ratio_concat_over_add", "#2a7ab9", "torch (NCHW)"),
                                    ("torch", "ratio_concat_over_add_nhwc", "#7fb77e", "torch (channels-last)"),
                                    ("onnxruntime", "ratio_concat_over_add", "#c0504d", "ONNX Runtime")):
        if all(key in r[side] for r in rows):
            ax.plot(batches, [r[side][key] for r in rows], "o-", color=color, label=label)
    paper = result["paper_table1"]
    ax.plot(paper["batch"], paper["ratio"], "s--", color="#555555", label="paper (ARM phone, MNN)")
    ax.axhline(1.0, color="#999999", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("concat time / add time")
    ax.set_title("relative cost, one thread", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle("concatenation vs add at GhostNet 1.0x's shapes" + ("  [quick run: noisy]" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
