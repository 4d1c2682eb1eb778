"""The ptxas compile gate (tests/cpp/ptxas_gate.py) on reports written here: it passes a
clean report and fails on a spill, a stack frame, advisory C7510 and a missing kernel, at
D = Dv and at MLA's (D, Dv) = (192, 128)."""
import importlib.util
import pathlib
import sys

_spec = importlib.util.spec_from_file_location(
    "ptxas_gate", pathlib.Path(__file__).parent / "cpp" / "ptxas_gate.py")
gate = importlib.util.module_from_spec(_spec)
sys.modules["ptxas_gate"] = gate  # dataclasses look their module up
_spec.loader.exec_module(gate)

MANGLED = {
    "fwd_kernel": "_ZN8distattn4kern10fwd_kernelI{t}Li{d}ELi{dv}EEEvNS_9FwdParamsE",
    "bwd_kv_kernel": "_ZN8distattn4kern13bwd_kv_kernelI{t}Li{d}ELi{dv}EEEvNS_9BwdParamsE",
    "bwd_q_kernel": "_ZN8distattn4kern12bwd_q_kernelI{t}Li{d}ELi{dv}EEEvNS_9BwdParamsE",
}
TYPES = {"fp16": "6__half", "bf16": "13__nv_bfloat16"}
DIMS = {(64, 64): "hd64", (128, 128): "hd128", (192, 128): "hd192x128"}
GATED = [64, 128, "192x128"]


def report(arch="80", spill=None, stack=None, extra=""):
    """A ptxas -v report for every gated kernel on one architecture; `spill`/`stack` put
    bytes into the one kernel named."""
    lines = ["ptxas info    : 9 bytes gmem"]
    for kind, pattern in MANGLED.items():
        for dtype, t in TYPES.items():
            for (d, dv), hd in DIMS.items():
                name = pattern.format(t=t, d=d, dv=dv)
                label = f"{kind}<{dtype} {hd}>"
                s = 8 if label == spill else 0
                f = 16 if label == stack else 0
                lines += [f"ptxas info    : Compiling entry function '{name}' for 'sm_{arch}'",
                          f"ptxas info    : Function properties for {name}",
                          f"    {f} bytes stack frame, {s} bytes spill stores, {s} bytes spill "
                          f"loads",
                          "ptxas info    : Used 168 registers, used 1 barriers, 480 bytes cmem[0]"]
    if arch == "90a":  # the Hopper forward, dK/dV and dQ kernels, D = Dv = 64 and 128
        for kind, mangled in (("fwd_sm90_kernel", "15fwd_sm90_kernel"),
                              ("bwd_kv_sm90_kernel", "18bwd_kv_sm90_kernel"),
                              ("bwd_q_sm90_kernel", "17bwd_q_sm90_kernel")):
          for dtype, t in TYPES.items():
            for d in (64, 128):
                name = (f"_ZN8distattn4kern{mangled}I{t}Li{d}ELi{d}EEEvNS0_11"
                        f"{'Fwd' if kind[0] == 'f' else 'Bwd'}Sm90ArgsE")
                s = 8 if f"{kind}<{dtype} hd{d}>" == spill else 0
                lines += [f"ptxas info    : Compiling entry function '{name}' for 'sm_{arch}'",
                          f"ptxas info    : Function properties for {name}",
                          f"    0 bytes stack frame, {s} bytes spill stores, {s} bytes spill "
                          f"loads",
                          "ptxas info    : Used 168 registers, used 16 barriers"]
    lines += ["ptxas info    : Compiling entry function "
              "'_ZN8distattn4kern12delta_kernelI6__halffEEvNS_9BwdParamsE' for 'sm_" + arch + "'",
              "ptxas info    : Function properties for "
              "_ZN8distattn4kern12delta_kernelI6__halffEEvNS_9BwdParamsE",
              "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"]
    return "\n".join(lines) + extra


def check(text, archs=("80",)):
    entries, c7510 = gate.parse(text)
    return entries, gate.violations(entries, c7510, list(archs), GATED)


def test_clean_report_passes_and_is_parsed():
    entries, bad = check(report("80") + "\n" + report("90a"), archs=("80", "90a"))
    assert bad == []
    assert len(entries) == 2 * 19 + 12
    fwd = [e for e in entries if e.label == "sm_90a fwd_kernel<bf16 hd128>"]
    assert len(fwd) == 1 and fwd[0].registers == 168 and fwd[0].stack == 0
    mla = [e for e in entries if e.label == "sm_80 bwd_kv_kernel<fp16 hd192x128>"]
    assert len(mla) == 1 and mla[0].dims == (192, 128)
    assert {e.kind for e in entries} == {"fwd_kernel", "bwd_kv_kernel", "bwd_q_kernel",
                                         "delta_kernel", "fwd_sm90_kernel",
                                         "bwd_kv_sm90_kernel", "bwd_q_sm90_kernel"}
    hop = [e for e in entries if e.label == "sm_90a fwd_sm90_kernel<fp16 hd64>"]
    assert len(hop) == 1 and hop[0].registers == 168


def test_spill_stack_c7510_and_missing_kernels_fail():
    _, bad = check(report(spill="bwd_kv_kernel<bf16 hd128>"))
    assert len(bad) == 1 and "sm_80 bwd_kv_kernel<bf16 hd128>: 0 bytes stack frame, 8 bytes" in bad[0]
    _, bad = check(report(stack="fwd_kernel<fp16 hd64>"))
    assert len(bad) == 1 and "16 bytes stack frame" in bad[0]
    _, bad = check(report(spill="bwd_q_kernel<bf16 hd192x128>"))
    assert len(bad) == 1 and "sm_80 bwd_q_kernel<bf16 hd192x128>: 0 bytes stack" in bad[0]
    _, bad = check(report(extra="\nptxas warning : (C7510) Potential Performance Loss: wgmma"))
    assert len(bad) == 1 and "C7510" in bad[0]
    _, bad = check(report("80"), archs=("80", "90a"))
    assert len(bad) == 30 and all("sm_90a" in b and "no ptxas report" in b for b in bad)
    assert sum("fwd_sm90_kernel" in b for b in bad) == 4
    assert sum("bwd_kv_sm90_kernel" in b for b in bad) == 4
    assert sum("bwd_q_sm90_kernel" in b for b in bad) == 4
    _, bad = check(report("90a", spill="fwd_sm90_kernel<bf16 hd128>"), archs=("90a",))
    assert len(bad) == 1 and "sm_90a fwd_sm90_kernel<bf16 hd128>: 0 bytes stack" in bad[0]
    _, bad = check(report("90a", spill="bwd_kv_sm90_kernel<fp16 hd64>"), archs=("90a",))
    assert len(bad) == 1 and "sm_90a bwd_kv_sm90_kernel<fp16 hd64>: 0 bytes stack" in bad[0]
    _, bad = check(report("90a", spill="bwd_q_sm90_kernel<bf16 hd128>"), archs=("90a",))
    assert len(bad) == 1 and "sm_90a bwd_q_sm90_kernel<bf16 hd128>: 0 bytes stack" in bad[0]
    _, bad = check("")
    assert len(bad) == 18
    assert any("fwd_kernel<fp16 hd192x128>: no ptxas report" in b for b in bad)


def test_head_dims_outside_the_gate_may_spill():
    hd256 = MANGLED["bwd_kv_kernel"].format(t=TYPES["bf16"], d=256, dv=256)
    text = report() + (f"\nptxas info    : Compiling entry function '{hd256}' for 'sm_80'\n"
                       f"ptxas info    : Function properties for {hd256}\n"
                       f"    1312 bytes stack frame, 1312 bytes spill stores, 1400 bytes spill "
                       f"loads\n")
    _, bad = check(text)
    assert bad == []


def test_main_reads_logs_under_a_build_dir(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "fwd.cu.o.ptxas.log").write_text(report())
    assert gate.main([str(tmp_path), "--archs", "80"]) == 0
    (tmp_path / "a" / "bad.cu.o.ptxas.log").write_text(
        "ptxas warning : (C7510) Potential Performance Loss\n")
    assert gate.main([str(tmp_path), "--archs", "80"]) == 1
    assert "C7510" in capsys.readouterr().err


def test_old_single_head_dim_names_and_dim_specs_parse():
    """A kernel named with one int argument (D) is read as (D, D); specs D and DxDv too."""
    name = "_ZN8distattn4kern10fwd_kernelI6__halfLi64EEEvNS_9FwdParamsE"
    entries, _ = gate.parse(f"ptxas info    : Compiling entry function '{name}' for 'sm_80'")
    assert entries[0].dims == (64, 64) and entries[0].label == "sm_80 fwd_kernel<fp16 hd64>"
    assert gate.parse_dims("192x128") == (192, 128) and gate.parse_dims(64) == (64, 64)


def test_sass_gate_parses_functions_and_counts_hopper_instructions():
    spec = importlib.util.spec_from_file_location(
        "sass_gate", pathlib.Path(__file__).parent / "cpp" / "sass_gate.py")
    sass = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass)
    listing = "\n".join([
        "\tcode for sm_90a",
        "\t\tFunction : _ZN8distattn4kern15fwd_sm90_kernelI6__halfLi64ELi64EEEvNS0_11FwdSm90ArgsE",
        "        /*0100*/   UTMALDG.4D [UR8], [UR4] ;",
        "        /*0110*/   SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ, [UR4], RZ ;",
        "        /*0120*/   HGMMA.64x128x16.F32 R24, gdesc[UR8], RZ, !UPT ;",
        "        /*0130*/   USETMAXREG.DEALLOC.CTAPOOL 0x18 ;",
        "\tcode for sm_80",
        "\t\tFunction : _ZN8distattn4kern15fwd_sm90_kernelI6__halfLi64ELi64EEEvNS0_11FwdSm90ArgsE",
        "        /*0000*/   EXIT ;",
    ])
    funcs = sass.parse_sass(listing)
    assert [(a, c) for a, _, c in funcs] == [
        ("sm_90a", {"UTMALDG": 1, "SYNCS": 1, "HGMMA": 1, "USETMAXREG": 1}), ("sm_80", {})]
