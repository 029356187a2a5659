"""bench/kernel_report.py: the static sm_90 / sm_80 kernel report and its anchors.

The SASS reading is checked on hand-written listings (loops, prefetch, MMA FLOPs); the whole
report runs on the reduced workload set in a child process (it needs TRITON_INTERPRET=0 and
Triton's bundled ptxas / cuobjdump, no GPU) and its anchor rows must show what fast code looks
like (wgmma on sm_90, mma.sync on sm_80, no spills, a found MMA loop), so the report cannot
silently stop measuring. The anchors themselves are checked against PyTorch in the interpreter.
"""
import json
import os
import subprocess
import sys

import torch

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import kernel_report as kr  # noqa: E402

H100 = kr.GPUS["sm_90"]


def _sass(lines):
    """[(address, opcode, operands)] from 'OPCODE operands' lines at 16-byte steps."""
    text = "\n".join(f"        /*{16 * i:04x}*/                   {l} ;" for i, l in enumerate(lines))
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in kr._SASS.finditer(text)]


def _listing(prologue_copies=2, wait=None, extra_loop=(), after_exit=True):
    lines = ["S2R R0, SR_TID.X"]
    lines += ["LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]", "LDGDEPBAR"] * prologue_copies
    start = len(lines)
    lines += ["IADD3 R3, R3, 0x1, RZ",
              "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24",
              "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0",
              "MUFU.EX2 R5, R5", *extra_loop,
              "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]", "LDGDEPBAR"]
    if wait is not None:
        lines.append(f"DEPBAR.LE SB0, {wait:#x}")
    lines.append(f"@P0 BRA {16 * start:#x}")
    lines += ["EXIT"]
    if after_exit:  # an out-of-line wait stub jumping back into the body: not a loop
        lines += ["SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4]", f"BRA {16 * (start + 1):#x}"]
    return _sass(lines), start


def test_analyse_finds_the_mma_loop_and_its_costs():
    ins, start = _listing()
    a = kr.analyse(ins, num_warps=8)
    loop = a["loop"]
    assert loop["start"] == hex(16 * start)
    assert a["wgmma"] == 2 and a["cp_async"] == 3 and loop["mma"] == 2 and loop["mufu"] == 1
    assert loop["instructions"] == 7  # IADD3, 2 HGMMA, MUFU, LDGSTS, LDGDEPBAR, BRA
    assert loop["flops"] == 2 * (2 * 64 * 128 * 16) * 2  # two warpgroups of 8 warps
    assert loop["kind"] == "bf16" and loop["prefetch"] == 2


def test_analyse_innermost_loop_and_sync_loads():
    # a nested loop: the inner one holds the MMAs, the outer one more; no async copies -> 0
    lines = ["S2R R0, SR_TID.X", "LDG.E R4, desc[UR4][R2.64]",
             "HMMA.16816.F32.BF16 R8, R12, R16, R8", "@P1 BRA 0x20",
             "IADD3 R3, R3, 0x1, RZ", "@P0 BRA 0x10", "EXIT"]
    a = kr.analyse(_sass(lines), num_warps=4)
    assert a["loop"]["start"] == "0x20" and a["loop"]["instructions"] == 2
    assert a["loop"]["flops"] == 2 * 16 * 8 * 16 * 4 and a["loop"]["prefetch"] == 0
    assert a["mma_sync"] == 1 and a["wgmma"] == 0


def test_analyse_without_a_loop():
    a = kr.analyse(_sass(["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "EXIT"]), 4)
    assert a["loop"] is None and kr.model(H100, a["loop"], 4) is None


def test_model_bounds():
    ins, _ = _listing()
    loop = kr.analyse(ins, 8)["loop"]
    m = kr.model(H100, loop, 8)
    tc = loop["flops"] / 4096
    issue = loop["instructions"] * 8 / 4
    mufu = 1 * 8 * 32 / 16
    assert m["overlap"] == pytest.approx(tc / max(tc, issue, mufu))
    assert m["serial"] == pytest.approx(tc / (tc + issue + mufu))
    assert 0 < m["serial"] < m["overlap"] <= 1
    # many more instructions: issue-bound, the ceiling drops
    ins2, _ = _listing(extra_loop=["IADD3 R3, R3, 0x1, RZ"] * 200)
    m2 = kr.model(H100, kr.analyse(ins2, 8)["loop"], 8)
    assert m2["bound"] == "issue" and m2["overlap"] < m["overlap"]


def test_step_ceilings_weight_kernels_by_their_work():
    wl = kr.Workload("op", "w", None, flop_share=(("fwd", 1 / 3), ("bwd", 2 / 3)))
    rows = [dict(op="op", workload="w", target="sm_90", kernel="fwd", sm_fill=1.0,
                 modelled=dict(overlap=0.5, serial=0.25)),
            dict(op="op", workload="w", target="sm_90", kernel="bwd", sm_fill=0.5,
                 modelled=dict(overlap=1.0, serial=0.5)),
            dict(op="op", workload="w", target="sm_90", kernel="merge", sm_fill=0.1, modelled=None)]
    (r,) = kr.step_ceilings(rows, [wl])
    assert r["overlap"] == pytest.approx(1 / ((1 / 3) / 0.5 + (2 / 3) / 0.5))
    assert r["serial"] == pytest.approx(1 / ((1 / 3) / 0.25 + (2 / 3) / 0.25))
    assert kr.step_ceilings(rows[:1], [wl]) == []  # a kernel missing: no figure


def test_occupancy():
    assert kr.occupancy(H100, 255, 1024, 8) == (1, "regs")  # 256 x 32 x 8 = 65,536 registers
    assert kr.occupancy(H100, 32, 200 * 1024, 4) == (1, "smem")
    assert kr.occupancy(H100, 24, 0, 16) == (4, "warps")


def test_peaks():
    assert kr.GPUS["sm_90"].peak_tflops == pytest.approx(989, rel=0.01)
    assert kr.GPUS["sm_80"].peak_tflops == pytest.approx(312, rel=0.01)


# ------------------------------------------------------------------ the whole report
@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("kernel_report")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_report.py"), "--quick",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "kernel_report.json") as f:
        return json.load(f), (out / "kernel_report.md").read_text()


@pytest.mark.slow
def test_report_runs_and_anchor_rows_are_as_expected(quick_report):
    report, md = quick_report
    rows = report["rows"]
    anchors = [r for r in rows if r["op"] == "anchor"]
    assert {r["target"] for r in anchors} == {"sm_90", "sm_80"} and len(anchors) == 6
    for r in anchors:
        assert r["loop"] and r["loop"]["instr_per_mflop"] > 0, r
        # no spills and pipelined loads on the configs' own targets (the TMA configs are
        # Hopper's: on sm_80 Triton lowers their descriptors to plain loads, and the 128 x 128
        # attention tile spills there)
        if r["target"] == "sm_90" or "TMA" not in r["workload"]:
            assert r["spill_bytes"] == 0 and r["stl"] == 0, r
            assert r["loop"]["prefetch"] >= 1, r
        assert 0 < r["modelled"]["serial"] <= r["modelled"]["overlap"] <= 1
        if r["target"] == "sm_90":
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, r
        else:
            assert r["mma_sync"] > 0 and r["wgmma"] == 0, r
    tma = [r for r in anchors if "TMA" in r["workload"] and r["target"] == "sm_90"]
    assert tma and all(r["tma"] > 0 and r["mbarrier"] > 0 for r in tma)
    attn = [r for r in anchors if r["workload"].startswith("attention") and r["target"] == "sm_90"]
    assert all(r["loop"]["ex2"] > 0 for r in attn)  # the softmax's exp2 sits in the MMA loop
    # the project's kernels are captured from their live launch paths, on both targets
    for op, kernels in (("nt_xent", {"_nt_xent_fwd_kernel", "_nt_xent_bwd_kernel"}),
                        ("masked_conv", {"_conv_gemm_kernel"})):
        for target in ("sm_90", "sm_80"):
            got = {r["kernel"] for r in rows if r["op"] == op and r["target"] == target}
            assert kernels <= got, (op, target, got)
    assert "modelled" in md and "| anchor |" in md


@pytest.mark.slow
def test_masked_conv_rows_do_not_spill(quick_report):
    """Every masked-conv kernel of the quick set compiles without spills on sm_90 and sm_80,
    the 128x128 mask blocks' 1x1 stride-2 shortcut included (its grad_weight at 4 warps spilled
    80 B / 888 B of stack before the kernel dropped the one tap's runtime offset, issue #22)."""
    rows = [r for r in quick_report[0]["rows"] if r["op"] == "masked_conv"]
    wgt = [r for r in rows if "128x128" in r["workload"] and "shortcut" in r["workload"]
           and r["kernel"] == "_bwd_weight_kernel"]
    assert {r["target"] for r in wgt} == {"sm_90", "sm_80"}, [r["workload"] for r in rows]
    assert all(r["num_warps"] == 4 for r in wgt), wgt
    # its grad_input (stride 2) is compiled as the launch runs it: by phases, 8 warps on sm_90
    gi = [r for r in rows if "128x128" in r["workload"] and "shortcut" in r["workload"]
          and "TRANSPOSED" in r["note"]]
    assert {r["target"] for r in gi} == {"sm_90", "sm_80"} and all("PHASES 2x2" in r["note"] for r in gi), gi
    assert [r["num_warps"] for r in gi if r["target"] == "sm_90"] == [8], gi
    for r in rows:
        assert r["spill_bytes"] == 0 and r["stl"] == 0 and r["ldl"] == 0, \
            (r["workload"], r["kernel"], r["target"], r["spill_bytes"], r["regs"])


@pytest.mark.slow
def test_report_rejects_bad_arguments(tmp_path):
    for args, msg in ((["--targets", "sm_70"], "--targets takes"), (["--only", "nothing-matches"], "matches no")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_report.py"), *args,
                               "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and msg in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------ the anchors compute what they claim
# In the interpreter, where fp32 tl.dot is exact (a GPU would use TF32 for these fp32 inputs).
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="fp32 exactness: interpreter")
def _attention_reference(q, k, v):
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1) @ v.double()


@interpreter_only
@pytest.mark.parametrize("tma", [False, True])
def test_attention_anchor_matches_softmax(tma):
    import kernel_anchors as ka

    if tma and ka.TensorDescriptor is None:
        pytest.skip("no tensor descriptors in this Triton")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    o = ka.attention_fwd(q, k, v, tma)
    torch.testing.assert_close(o.double(), _attention_reference(q, k, v), atol=1e-4, rtol=1e-4)


@interpreter_only
@pytest.mark.parametrize("tma", [False, True])
def test_matmul_anchor_matches_torch(tma):
    import kernel_anchors as ka

    if tma and ka.TensorDescriptor is None:
        pytest.skip("no tensor descriptors in this Triton")
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 136, generator=g)  # rows of 16-byte multiples (descriptors)
    b = torch.randn(136, 264, generator=g)
    c = ka.matmul(a, b, tma)
    torch.testing.assert_close(c.double(), a.double() @ b.double(), atol=1e-3, rtol=1e-4)


def test_attention_anchor_rejects_ragged_context():
    import kernel_anchors as ka

    q = torch.zeros(1, 1, 100, 16)
    with pytest.raises(ValueError, match="N_CTX must be a multiple of 128"):
        ka.attention_fwd(q, q, q, False)
