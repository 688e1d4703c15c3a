"""bench.py: the --quick smoke run produces the tables (timings are reported, never asserted)."""
import pytest

import bench


def test_quick_bench_runs(capsys):
    bench.main(["--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    for row in ("fp32 F.linear", "int8 GEMM alone", "W4A4 HadaNorm |", "W4A4 HQ-DM |", "W4A16",
                "ISA:",
                "| W4A4 HadaNorm (integer) |", "CPU system s"):
        assert row in out
    assert "peak RSS" in out


def test_cuda_without_cuda_is_an_error():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench.main(["--device", "cuda", "--quick"])
