"""Sparse formats: the 2:4 pattern check, CSR and semi-structured conversion against dense results, shapes,
timing bookkeeping and the sparse benchmark's JSON (speed itself is never asserted: these machines are noisy)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from effllm import bench, sparse
from effllm.adapters import get_adapter
from effllm.experiments import sparse_speed, timing
from effllm.models import tiny_model
from effllm.pruning import magnitude_mask, prune


def brute_force_violation(weight: torch.Tensor, n: int = 2, m: int = 4):
    """The first (row, group, zeros) with fewer than n zeros, by plain loops."""
    for row in range(weight.shape[0]):
        for group in range(weight.shape[1] // m):
            zeros = sum(1 for value in weight[row, group * m:(group + 1) * m].tolist() if value == 0)
            if zeros < n:
                return row, group, zeros
    return None


def cuda_2_4_reason() -> str | None:
    return sparse.semi_structured_unavailable_reason("cpu") if not torch.cuda.is_available() \
        else sparse.semi_structured_unavailable_reason("cuda")


requires_2_4_gpu = pytest.mark.skipif(
    cuda_2_4_reason() is not None, reason=f"2:4 semi-structured kernels need a CUDA GPU: {cuda_2_4_reason()}")


# --------------------------------------------------------------------------------------------------
# The 2:4 pattern


@pytest.mark.parametrize("seed", range(5))
def test_violation_finder_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(12, 32, generator=generator)
    weight[torch.rand(12, 32, generator=generator) < 0.45] = 0  # some groups pass, some fail
    assert sparse.find_pattern_violation(weight) == brute_force_violation(weight)
    assert sparse.find_pattern_violation(weight, 1, 4) == brute_force_violation(weight, 1, 4)


@pytest.mark.parametrize("shape", [(8, 16), (64, 128), (576, 1536)])
def test_2_4_magnitude_mask_gives_a_valid_pattern(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    weight[magnitude_mask(weight, 0.5, (2, 4))] = 0
    sparse.check_2_4(weight)  # raises if any group has fewer than 2 zeros
    assert sparse.is_2_4(weight)
    assert float((weight == 0).float().mean()) == pytest.approx(0.5)


def test_pruned_random_weight_has_the_pattern_it_names():
    shape = sparse.ProjectionShape("q", 48, 64)
    two_four = sparse_speed.pruned_random_weight(shape, "2:4")
    assert sparse.is_2_4(two_four)
    unstructured = sparse_speed.pruned_random_weight(shape, "unstructured", 0.5)
    assert ((unstructured == 0).sum(dim=1) == 32).all()  # int(64 * 0.5) zeros in every row


def test_model_pruned_2_4_passes_the_check_and_dense_model_does_not():
    model, _ = tiny_model("llama")
    adapter = get_adapter(model)
    dense_q = adapter.weight(adapter.attention_projections(0)["q"])
    with pytest.raises(sparse.SparsePatternError, match="row 0, group 0"):
        sparse.check_2_4(dense_q, "q_proj")
    prune(model, "magnitude", None, pattern="2:4", progress=False)
    for i in range(adapter.num_layers):
        for name, module in adapter.linears(i).items():
            sparse.check_2_4(adapter.weight(module), name)


def test_check_names_the_first_bad_row_and_group():
    weight = torch.zeros(6, 16)
    weight[:, 0::2] = 1.0  # exactly 2 zeros in every group of 4: valid
    sparse.check_2_4(weight)
    weight[3, 9] = 2.0  # row 3, group 2 (columns 8..11) now has one zero
    weight[5, 0] = 2.0  # a later violation must not be the one reported
    with pytest.raises(sparse.SparsePatternError) as info:
        sparse.check_2_4(weight, "layers.0.mlp.up_proj")
    message = str(info.value)
    assert "layers.0.mlp.up_proj" in message and "row 3, group 2" in message and "columns 8..11" in message
    assert "1 zero(s)" in message
    assert not sparse.is_2_4(weight)


def test_check_rejects_bad_input_clearly():
    with pytest.raises(sparse.SparsePatternError, match="multiple of 4"):
        sparse.check_2_4(torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"2-D weight.*\(2, 3, 4\)"):
        sparse.check_2_4(torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------------------------------
# CSR (runs everywhere)


@pytest.mark.parametrize("leading", [(1,), (16,), (2, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_csr_linear_matches_dense(leading, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        linear.weight[magnitude_mask(linear.weight, 0.5)] = 0
    csr = sparse.CSRLinear.from_module(linear)
    x = torch.randn(*leading, 64)
    torch.testing.assert_close(csr(x), linear(x), rtol=1e-5, atol=1e-5)
    assert csr.nnz == int((linear.weight != 0).sum())
    torch.testing.assert_close(csr.to_dense_weight(), linear.weight.detach())
    torch.testing.assert_close(copy.deepcopy(csr)(x), linear(x), rtol=1e-5, atol=1e-5)  # CSR buffers copy


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_csr_model_gives_the_pruned_dense_logits(family):
    model, _ = tiny_model(family)
    prune(model, "magnitude", 0.5, progress=False)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    sparse_model, report = sparse.sparse_copy(model, "csr")
    adapter = get_adapter(model)
    linears = [name for i in range(adapter.num_layers) for name in adapter.linears(i)]
    assert sorted(report.name) == sorted(linears)
    assert set(report.format) == {"csr"}
    assert report.density.between(0.45, 0.55).all()
    assert all(isinstance(sparse_model.get_submodule(name), sparse.CSRLinear) for name in linears)
    with torch.no_grad():
        torch.testing.assert_close(sparse_model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    agreement = sparse_speed.output_agreement(model, sparse_model, ids[:1], new_tokens=6)
    assert agreement["greedy_token_agreement"] == 1.0
    assert agreement["max_abs_logit_difference"] < 1e-4


def test_bad_requests_leave_the_model_untouched():
    model, _ = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="Unknown sparse format 'bsr'.*semi-structured, csr"):
        sparse.sparsify_model(model, "bsr")
    with pytest.raises(ValueError, match="Unknown backend"):
        sparse.sparsify_model(model, "csr", backend="cusparse")
    with pytest.raises(ValueError, match="torchao.*semi-structured"):
        sparse.sparsify_model(model, "csr", backend="torchao")
    if cuda_2_4_reason() is not None:
        with pytest.raises(sparse.SparseFormatUnavailableError, match="CUDA GPUs with compute capability >= 8.0"):
            sparse.sparsify_model(model, "semi-structured")
    assert [type(m) for m in model.modules()] == types_before
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_converting_twice_is_refused():
    model, _ = tiny_model("llama")
    sparse.sparsify_model(model, "csr")
    with pytest.raises(ValueError, match="already sparse"):
        sparse.sparsify_model(model, "csr")


# --------------------------------------------------------------------------------------------------
# Semi-structured: constraints (pure), conversion (CUDA only)


def test_semi_structured_constraints_and_reasons():
    assert sparse.semi_structured_constraints(torch.float16, "cusparselt") == (16, 16)
    assert sparse.semi_structured_constraints(torch.bfloat16, "cutlass") == (32, 64)
    assert sparse.semi_structured_constraints(torch.float32, "cusparselt") is None
    assert sparse.semi_structured_shape_reason(576, 1536, torch.float16, "cusparselt") is None
    assert sparse.semi_structured_shape_reason(13824, 5120, torch.bfloat16, "cutlass") is None
    reason = sparse.semi_structured_shape_reason(100, 64, torch.float16, "cusparselt")
    assert "[100, 64]" in reason and "multiple of 16" in reason
    assert "float16, bfloat16" in sparse.semi_structured_shape_reason(64, 64, torch.float32, "cusparselt")
    with pytest.raises(ValueError, match="Unknown semi-structured backend"):
        sparse.semi_structured_constraints(torch.float16, "cublas")


def test_cpu_has_no_2_4_kernel_and_says_so():
    reason = sparse.semi_structured_unavailable_reason("cpu")
    assert reason is not None and "CPU" in reason
    env = sparse.environment("cpu")
    assert env["format"] == "csr" and env["pattern"] == "unstructured"
    assert "No 2:4 semi-structured sparse kernel exists on CPU" in env["note"]
    with pytest.raises(sparse.SparseFormatUnavailableError, match="CUDA"):
        sparse.to_semi_structured(torch.zeros(16, 16))
    with pytest.raises(sparse.SparseFormatUnavailableError, match="semi-structured"):
        sparse_speed.projection_timings([sparse.ProjectionShape("q", 16, 16)], [1], "semi-structured", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(sparse.SparseFormatUnavailableError, match="no CUDA GPU"):
        sparse.resolve_device("cuda")


@requires_2_4_gpu
@pytest.mark.parametrize("tokens", [1, 16, 100])
def test_semi_structured_matmul_matches_dense_on_gpu(tokens):
    shape = sparse.ProjectionShape("up", 256, 128)
    weight = sparse_speed.pruned_random_weight(shape, "2:4", dtype=torch.float16, device="cuda")
    x = torch.randn(tokens, 128, device="cuda", dtype=torch.float16)
    sparse_weight = sparse.to_semi_structured(weight)
    torch.testing.assert_close(nn.functional.linear(x, sparse_weight), nn.functional.linear(x, weight),
                               rtol=1e-2, atol=1e-2)
    with pytest.raises(sparse.SparsePatternError):
        sparse.to_semi_structured(torch.ones(256, 128, device="cuda", dtype=torch.float16))


@requires_2_4_gpu
@pytest.mark.parametrize("backend", ["torch", "torchao"])
def test_semi_structured_model_matches_pruned_dense_on_gpu(backend):
    if backend == "torchao" and sparse.torchao_version() is None:
        pytest.skip("torchao is not installed (the optional `sparse` extra)")
    model, _ = tiny_model("llama")
    model = model.to("cuda", torch.float16)
    prune(model, "magnitude", None, pattern="2:4", progress=False)
    ids = torch.randint(3, 250, (1, 16), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits.float()
    sparse_model, report = sparse.sparse_copy(model, "semi-structured", backend)
    assert set(report.format) <= {"semi-structured", "dense"}
    assert (report.format == "semi-structured").any()
    with torch.no_grad():
        torch.testing.assert_close(sparse_model(ids).logits.float(), expected, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------------
# Shapes and timing bookkeeping


def test_shapes_from_the_adapter_and_the_codellama_table():
    model, _ = tiny_model("llama")
    shapes = {s.kind: (s.out_features, s.in_features) for s in sparse.shape_set("model", model)}
    assert shapes == {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (128, 64),
                      "up": (128, 64), "down": (64, 128)}
    codellama = {s.kind: (s.out_features, s.in_features) for s in sparse.shape_set("codellama-13b")}
    assert codellama == {"q": (5120, 5120), "k": (5120, 5120), "v": (5120, 5120), "o": (5120, 5120),
                         "gate": (13824, 5120), "up": (13824, 5120), "down": (5120, 13824)}
    with pytest.raises(ValueError, match="Unknown shape set 'llama-70b'; allowed: model, codellama-13b"):
        sparse.shape_set("llama-70b")
    with pytest.raises(ValueError, match="needs the model"):
        sparse.shape_set("model")


def test_projection_timings_rows():
    shapes = [sparse.ProjectionShape("q", 32, 64), sparse.ProjectionShape("down", 64, 128)]
    table = sparse_speed.projection_timings(shapes, [1, 4], "csr", device="cpu", min_run_time=0.001, rounds=1,
                                      progress=False, threads=1)
    assert list(zip(table.kind, table.tokens, strict=True)) == [("q", 1), ("q", 4), ("down", 1), ("down", 4)]
    assert (table.format == "csr").all() and (table.pattern == "unstructured").all()
    assert (table.dense_ms > 0).all() and (table.sparse_ms > 0).all()
    assert table.speedup.tolist() == pytest.approx((table.dense_ms / table.sparse_ms).tolist())
    assert (table.max_abs_error < 1e-4).all()  # the CSR product equals the dense one
    with pytest.raises(ValueError, match="positive integers"):
        sparse_speed.projection_timings(shapes, [0, 4], "csr", device="cpu")


def test_num_threads_restores_the_setting():
    before = torch.get_num_threads()
    with timing.num_threads(1) as threads:
        assert threads == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive integer"):
        with timing.num_threads(0):
            pass


def test_end_to_end_rows_on_a_tiny_model():
    model, _ = tiny_model("llama")
    prune(model, "magnitude", 0.5, progress=False)
    sparse_model, _ = sparse.sparse_copy(model, "csr")
    ids = torch.randint(3, 250, (1, 10), generator=torch.Generator().manual_seed(0))
    table = sparse_speed.end_to_end_timings(model, sparse_model, ids, decode_tokens=3, min_run_time=0.001, rounds=1,
                                      threads=1)
    assert table.phase.tolist() == ["prefill", "decode"] and table.tokens.tolist() == [10, 3]
    assert table.speedup.tolist() == pytest.approx((table.dense_ms / table.sparse_ms).tolist())
    prefill = table.iloc[0]
    assert prefill.dense_tokens_per_s == pytest.approx(10 / (prefill.dense_ms / 1e3))
    with pytest.raises(ValueError, match="one prompt"):
        sparse_speed.end_to_end_timings(model, sparse_model, torch.ones(2, 4, dtype=torch.long))


def test_greedy_decode_equals_hf_generate():
    model, _ = tiny_model("llama")
    ids = torch.randint(3, 250, (1, 8), generator=torch.Generator().manual_seed(2))
    tokens, seconds = sparse_speed.greedy_step_seconds(model, ids, 5)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0)[0, 8:]
    assert tokens.tolist() == expected.tolist() and seconds > 0


# --------------------------------------------------------------------------------------------------
# The benchmark's bookkeeping


def test_sparse_benchmark_writes_its_json(tmp_path, capsys):
    out = tmp_path / "sparse.json"
    assert bench.main(["sparse", "--model", "tiny-llama", "--tokens", "1,3", "--min-run-time", "0.001",
                       "--rounds", "1", "--prompt-tokens", "8", "--decode-tokens", "3", "--threads", "1",
                       "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert result["device"].startswith("CPU") and result["device_type"] == "cpu"
    assert "No 2:4 semi-structured sparse kernel exists on CPU" in result["note"]
    assert "No 2:4 semi-structured sparse kernel exists on CPU" in printed
    assert result["format"] == "csr" and result["threads"] == 1 and result["token_counts"] == [1, 3]
    kinds_tokens = {(row["kind"], row["tokens"]) for row in result["projections"]}
    assert kinds_tokens == {(k, t) for k in sparse.PROJECTION_KINDS for t in (1, 3)}
    for row in result["projections"]:
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["sparse_ms"])
    e2e = result["end_to_end"]
    assert [row["phase"] for row in e2e["rows"]] == ["prefill", "decode"]
    assert e2e["layers_by_format"] == {"csr": 4 * 7}
    assert e2e["agreement"]["greedy_token_agreement"] == 1.0
    assert re.search(r"speedup", printed)


def test_sparse_benchmark_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        bench.main(["sparse", "--model", "tiny-llama", "--tokens", "1,x"])
    assert "--tokens must be comma-separated positive integers" in capsys.readouterr().err
    if cuda_2_4_reason() is not None:
        with pytest.raises(SystemExit):
            bench.main(["sparse", "--model", "tiny-llama", "--format", "semi-structured", "--device", "cpu"])
        assert "not available here" in capsys.readouterr().err


def test_projection_timings_report_the_median_round_and_its_spread():
    shapes = [sparse.ProjectionShape("q", 32, 64)]
    table = sparse_speed.projection_timings(shapes, [2], "csr", device="cpu", min_run_time=0.001, rounds=3,
                                            progress=False, threads=1)
    row = table.iloc[0]
    ratios = [d / s for d, s in zip(row.dense_rounds_ms, row.sparse_rounds_ms, strict=True)]
    assert row.rounds == 3 and len(row.dense_rounds_ms) == 3
    assert row.speedup == pytest.approx(sorted(ratios)[1])  # the median of the per-round ratios
    assert row.speedup_min == pytest.approx(min(ratios)) and row.speedup_max == pytest.approx(max(ratios))
    assert row.dense_ms == pytest.approx(sorted(row.dense_rounds_ms)[1])
    rounds = sparse_speed.projection_rounds(table)
    assert rounds["round"].tolist() == [0, 1, 2] and rounds.speedup.tolist() == pytest.approx(ratios)


def test_time_pair_rounds_interleaves_the_two():
    calls = []
    dense_times, sparse_times = timing.time_pair_rounds(lambda: calls.append("d"), lambda: calls.append("s"),
                                                        min_run_time=0.001, rounds=2)
    assert len(dense_times) == len(sparse_times) == 2
    first_sparse = calls.index("s")
    assert "d" in calls[first_sparse:]  # dense ran again after sparse: the rounds alternate
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        timing.time_pair_rounds(lambda: None, lambda: None, rounds=0)
