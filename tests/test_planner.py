"""Planner arithmetic against hand-computed values and the anchors' tables
(shared/reference/performance-anchors.md §5), plus the ``plan`` CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from lmcache_s3layer.admin import cli, planner
from lmcache_s3layer.admin.planner import GIB, MIB, LayoutSpec, LinkSpec, PlannerError

L8B = planner.get_model("llama-3.1-8b")
L70B = planner.get_model("llama-3.1-70b")
H100 = planner.GPUS["h100"]
H100_X8 = planner.get_gpu("h100", count=8)

LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- sizes --------------------------------------------------------------------------------


def test_kv_bytes_llama_8b_one_mebitoken_is_128_gib():
    pl = planner.plan(L8B, context_tokens=1 << 20, new_tokens=256)
    assert pl.bytes_per_token_per_layer == 2 * 8 * 128 * 2 == 4096
    assert pl.bytes_per_layer == 4 * GIB
    assert pl.kv_bytes == 128 * GIB


def test_params_per_layer_match_anchors_and_model_cards():
    assert L8B.params_per_layer == pytest.approx(218.1e6, rel=2e-4)  # §5.1
    assert L70B.params_per_layer == pytest.approx(855.6e6, rel=2e-4)  # §5.1 (855.65M, truncated)
    total_8b = L8B.num_layers * L8B.params_per_layer + L8B.embedding_params
    assert round(total_8b / 1e9, 2) == 8.03
    qwen = planner.get_model("Qwen/Qwen3-32B")
    assert round(qwen.num_layers * qwen.params_per_layer / 1e9, 1) == 31.2  # non-embedding
    assert qwen.attn_width == 8192 and qwen.kv_bytes_per_token_per_layer == 4096


def test_fp8_kv_halves_the_bytes():
    fp8 = replace(L8B, kv_dtype="fp8")
    assert fp8.kv_bytes_per_token_per_layer == 2048
    assert fp8.layer_weight_bytes == L8B.layer_weight_bytes  # weights stay bf16


# --- request counts -------------------------------------------------------------------------


def test_request_counts_hand_worked_100_chunks():
    # 25,600 tokens = 100 chunks -> segments of 64 and 36 chunks. Layer objects are 64 MiB
    # (8 parts of 8 MiB) and 36 MiB (5 parts).
    pl = planner.plan(L8B, context_tokens=100 * 256, new_tokens=256)
    ours, cl, tm = (pl.layouts[k] for k in ("segments", "chunk_layer", "token_major"))
    # Format v2: one pointer per segment (at its first chunk); a cold lookup still GETs the
    # pointer of every chunk it does not know (one parallel round) + one manifest per segment.
    assert ours.detail == {
        "segments": 2, "layer_objects": 64, "manifests": 2, "pointers": 2, "chunks": 100,
        "lookup_pointer_gets": 100, "lookup_manifest_gets": 2,
    }
    assert ours.objects == ours.put_requests == 64 + 2 + 2
    assert ours.get_requests_data == 32 * (8 + 5)
    assert ours.get_requests_lookup == 100 + 2
    assert pl.put_requests == 68 and pl.get_requests == 416 + 102

    def counts(lp):
        return lp.objects, lp.put_requests, lp.get_requests_data, lp.get_requests_lookup

    assert counts(cl) == (3200, 3200, 3200, 100)
    assert counts(tm) == (100, 100, 100, 100)
    assert ours.largest_object_bytes == 64 * MIB
    assert cl.largest_object_bytes == MIB and tm.largest_object_bytes == 32 * MIB


def test_request_counts_with_smaller_stores():
    # Stores of 4,096 tokens: six 16-chunk segments (16 MiB layers, 2 parts) and one of
    # 4 chunks (4 MiB, 1 part).
    pl = planner.plan(L8B, context_tokens=25_600, new_tokens=256, layout=LayoutSpec(store_tokens=4096))
    ours = pl.ours
    assert ours.detail["segments"] == 7
    assert ours.put_requests == 7 * 32 + 7 + 7
    assert ours.get_requests_data == 32 * (6 * 2 + 1)


def test_partial_chunk_counts_as_an_object():
    pl = planner.plan(L8B, context_tokens=10**6, new_tokens=1, layout=LayoutSpec(segment_max_chunks=1))
    assert pl.layouts["chunk_layer"].objects == 125_024  # §5.2
    assert pl.layouts["token_major"].objects == 3_907
    # A one-chunk segment degenerates to per-(chunk, layer) objects plus metadata (design.md).
    assert pl.ours.detail["layer_objects"] == 125_024


@pytest.mark.parametrize("context", [1, 255, 256, 257, 16_383, 16_384, 100_000, 1_000_003])
@pytest.mark.parametrize("store_tokens", [None, 256, 1000, 8192])
def test_segments_cover_the_prefix_exactly(context, store_tokens):
    layout = LayoutSpec(segment_max_chunks=8, store_tokens=store_tokens)
    groups = planner._segment_sizes(context, layout)
    assert sum(count * tokens for count, tokens in groups) == context
    assert all(0 < tokens <= 8 * 256 for _, tokens in groups)


# --- time -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,gpu,new,prefix,ms",
    [
        # §5.3 table cells (K = 2^10, so "1M" there is 2^20).
        (L8B, H100, 2048, 32 * 1024, 4.1),
        (L8B, H100, 256, 4 * 1024, 0.26),
        (L8B, H100, 256, 128 * 1024, 1.34),
        (L8B, H100, 256, 1 << 20, 9.1),
        (L8B, H100, 16_384, 1 << 20, 588),
        (L70B, H100_X8, 256, 128 * 1024, 0.39),
        (L70B, H100_X8, 2048, 1 << 20, 18.7),
    ],
)
def test_t_layer_matches_anchor_table(model, gpu, new, prefix, ms):
    assert rel(planner.layer_time_s(model, gpu, new, prefix) * 1e3, ms) < 0.03


def test_t_layer_is_memory_bound_for_a_single_token():
    # One decode-like token: reading 436 MB of weights dominates the FLOPs.
    t = planner.layer_time_s(L8B, H100, 1, 0)
    assert t == pytest.approx(L8B.layer_weight_bytes / 3.35e12 + 4096 / 3.35e12)


def test_hides_in_clear_cases():
    big_suffix = planner.plan(L8B, context_tokens=4096, new_tokens=16_384)
    assert big_suffix.hides and big_suffix.fetch_per_layer_ms < big_suffix.t_layer_ms
    chat_turn = planner.plan(L8B, context_tokens=128 * 1024, new_tokens=256)
    assert not chat_turn.hides
    # §5.3: hiding 128K needs ~401 GB/s at N=256.
    assert rel(chat_turn.bandwidth_needed_gbytes_per_s, 401) < 0.03


def test_new_tokens_to_hide_matches_closed_form_and_is_tight():
    # §5.3: N* = F_eff / (GQA * BW) = 4.945e14 / (4 * 12.5e9) ~ 9,890; the GEMM term the closed
    # form drops makes the exact answer a little smaller.
    pl = planner.plan(L8B, context_tokens=1 << 20, new_tokens=256)
    n = pl.new_tokens_to_hide
    assert 0.9 * 9890 < n <= 9890
    assert planner.plan(L8B, context_tokens=1 << 20, new_tokens=n).hides
    assert not planner.plan(L8B, context_tokens=1 << 20, new_tokens=n - 1).hides


def test_ttft_floor_fetch_bound():
    # 8B, 128K prefix, 256 new: fetch 536,870,912 B/layer at 12.5 GB/s = 42.95 ms per layer.
    pl = planner.plan(L8B, context_tokens=128 * 1024, new_tokens=256, link=LinkSpec(100, 20))
    t_fetch = 128 * 1024 * 4096 / 12.5e9 * 1e3
    assert pl.fetch_per_layer_ms == pytest.approx(t_fetch)
    assert pl.ttft_floor_ms == pytest.approx(20 + 32 * t_fetch + pl.t_layer_ms)
    # Stock token-major objects hold every layer, so nothing overlaps.
    assert pl.layouts["token_major"].ttft_floor_ms == pytest.approx(20 + 32 * t_fetch + 32 * pl.t_layer_ms)


def test_ttft_floor_compute_bound():
    pl = planner.plan(L8B, context_tokens=4096, new_tokens=16_384, link=LinkSpec(100, 20))
    assert pl.hides
    assert pl.ttft_floor_ms == pytest.approx(20 + pl.fetch_per_layer_ms + 32 * pl.t_layer_ms)


def test_no_prefix_means_no_load():
    pl = planner.plan(L8B, context_tokens=0, new_tokens=1000)
    assert pl.kv_bytes == 0 and pl.put_requests == 0 and pl.get_requests == 0
    assert pl.ttft_floor_ms == pytest.approx(pl.compute_ms)
    assert pl.load_vs_recompute == pytest.approx(1.0)


def test_recompute_matches_anchors():
    # §5.3 "Recompute prefix (50% MFU)": 367 s for 70B TP8 at 10^6 tokens, 563 s for 8B (the
    # anchors also charge the embedding table as FLOPs; we do not, hence ~1% lower).
    big = planner.plan(L70B, context_tokens=10**6, new_tokens=1, gpu=H100_X8)
    assert rel(big.recompute_ms / 1e3, 367) < 0.01
    assert rel(planner.plan(L8B, context_tokens=10**6, new_tokens=1).recompute_ms / 1e3, 563) < 0.015
    pl = planner.plan(L8B, context_tokens=10**6, new_tokens=1)
    # Loading at 12.5 GB/s takes ~10.5 s: the anchors' "~50x faster than recomputing".
    assert 45 < pl.load_vs_recompute < 60


def test_concurrency_littles_law():
    # §5.6: 1 MiB GETs at 20 ms TTFB -> ~34 MB/s each -> ~370 streams for 12.5 GB/s.
    assert rel(planner.stream_throughput(MIB, 0.020, 93e6) / 1e6, 33.5) < 0.01
    pl = planner.plan(L8B, context_tokens=10**6, new_tokens=256, layout=LayoutSpec(segment_max_chunks=1))
    assert 365 <= pl.layouts["chunk_layer"].concurrency_for_link <= 375
    # Ours reads 8 MiB parts: per stream 8 MiB / (20 ms + 90 ms) = 76 MB/s -> 165 streams.
    big = planner.plan(L8B, context_tokens=1 << 20, new_tokens=256)
    assert big.concurrency_needed == math.ceil(12.5e9 / (8 * MIB / (0.020 + 8 * MIB / 93e6)))
    # When a slower stream already hides the fetch, only that much concurrency is worth having.
    hidden = planner.plan(L8B, context_tokens=4096, new_tokens=16_384)
    assert hidden.concurrency_needed < hidden.ours.concurrency_for_link


# --- money ----------------------------------------------------------------------------------


def test_prices_s3_standard_match_section_5_5():
    pl = planner.plan(L8B, context_tokens=10**6, new_tokens=256, layout=LayoutSpec(segment_max_chunks=1))
    cl, tm = pl.layouts["chunk_layer"], pl.layouts["token_major"]
    assert cl.usd_per_store == pytest.approx(125_024 * 0.005 / 1000)  # $0.625
    assert cl.get_requests_data * 0.0004 / 1000 == pytest.approx(0.050, rel=0.01)
    assert tm.usd_per_store == pytest.approx(0.0195, rel=0.01)  # "$0.020"
    # Storage is billed per 2^30 bytes: 122.07 GiB x $0.023.
    assert cl.usd_per_month == pytest.approx(10**6 * 32 * 4096 / GIB * 0.023)


def test_segments_cut_put_cost_by_about_the_segment_size():
    pl = planner.plan(L8B, context_tokens=10**6, new_tokens=256)
    assert pl.usd_per_store < pl.layouts["chunk_layer"].usd_per_store / 20
    assert pl.usd_per_store == pytest.approx(pl.put_requests * 0.005 / 1000)


def test_prices_s3_express_match_section_5_5():
    pl = planner.plan(L8B, context_tokens=10**6, new_tokens=256, prices=planner.get_prices("s3-express"),
                      layout=LayoutSpec(segment_max_chunks=1))
    cl = pl.layouts["chunk_layer"]
    assert cl.usd_per_store == pytest.approx(0.53, rel=0.01)
    assert cl.usd_per_load == pytest.approx(0.077, rel=0.02)
    assert cl.usd_per_month == pytest.approx(122.07 * 0.11, rel=1e-3)


def test_custom_prices_need_the_request_and_storage_fields():
    with pytest.raises(PlannerError, match="--get-per-1k"):
        planner.get_prices("custom", put_per_1k=0.001, storage_per_gb_month=0.01)
    sheet = planner.get_prices("custom", put_per_1k=0.001, get_per_1k=0.0, storage_per_gb_month=0.01)
    assert sheet.upload_per_gb == 0 and sheet.put_per_1k == 0.001
    assert planner.get_prices("s3-standard", put_per_1k=0.0).put_per_1k == 0.0


# --- config.json ----------------------------------------------------------------------------


def write_config(tmp_path, cfg):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_hf_config_llama_matches_builtin(tmp_path):
    m = planner.model_from_hf_config(write_config(tmp_path, LLAMA_8B_CONFIG))
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.num_q_heads) == (32, 8, 128, 32)
    assert m.params_per_layer == L8B.params_per_layer
    assert m.embedding_params == L8B.embedding_params
    assert m.kv_bytes_per_token_per_layer == 4096


def test_hf_config_qwen3_head_dim_and_dtype_key(tmp_path):
    cfg = {
        "model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 25600,
        "num_attention_heads": 64, "num_hidden_layers": 64, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False, "dtype": "bfloat16",
    }
    m = planner.model_from_hf_config(write_config(tmp_path, cfg))
    assert m.params_per_layer == planner.get_model("qwen3-32b").params_per_layer
    assert m.dtype == "bfloat16"


def test_hf_config_fp32_and_mha_defaults(tmp_path):
    cfg = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
           "num_hidden_layers": 4, "torch_dtype": "float32"}
    m = planner.model_from_hf_config(write_config(tmp_path, cfg))
    assert m.num_kv_heads == 16 and m.head_dim == 64
    assert m.kv_bytes_per_token_per_layer == 2 * 16 * 64 * 4


def test_hf_config_moe_separates_active_from_resident(tmp_path):
    cfg = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
           "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000}
    m = planner.model_from_hf_config(write_config(tmp_path, cfg))
    attn = planner.dense_layer_params(4096, 32, 8, 128, 0)
    assert m.params_per_layer == attn + 3 * 4096 * 2 * 14336 + 4096 * 8
    assert m.weight_params_per_layer == attn + 3 * 4096 * 8 * 14336 + 4096 * 8


def test_hf_config_rejects_mla_and_bad_files(tmp_path):
    with pytest.raises(PlannerError, match="MLA"):
        planner.model_from_hf_config(write_config(tmp_path, {**LLAMA_8B_CONFIG, "kv_lora_rank": 512}))
    with pytest.raises(PlannerError, match="cannot read"):
        planner.model_from_hf_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlannerError, match="not valid JSON"):
        planner.model_from_hf_config(bad)
    with pytest.raises(PlannerError, match="num_hidden_layers"):
        planner.model_from_hf_config(write_config(tmp_path, {"hidden_size": 8}))


def test_unknown_model_lists_known():
    with pytest.raises(PlannerError) as exc:
        planner.get_model("gpt-5")
    for name in planner.MODELS:
        assert name in str(exc.value)


# --- CLI ------------------------------------------------------------------------------------

EXAMPLE = ["plan", "--model", "llama-3.1-8b", "--context", "1048576", "--new-tokens", "256",
           "--latency-ms", "20", "--bandwidth-gbps", "100"]


def test_cli_json(capsys):
    assert cli.main([*EXAMPLE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("kv_bytes", "put_requests", "get_requests", "hides", "ttft_floor_ms",
                "recompute_ms", "usd_per_store", "usd_per_load", "usd_per_month",
                "t_layer_ms", "fetch_per_layer_ms", "load_vs_recompute", "concurrency_needed",
                "bandwidth_needed_gbps", "bytes_per_token_per_layer", "layouts"):
        assert key in out, key
    assert out["kv_bytes"] == 128 * GIB
    assert out["hides"] is False
    assert set(out["layouts"]) == {"segments", "chunk_layer", "token_major"}
    assert out["put_requests"] == out["layouts"]["segments"]["put_requests"]


def test_cli_table(capsys):
    assert cli.main(EXAMPLE) == 0
    out = capsys.readouterr().out
    assert "128.00 GiB" in out and "TTFT floor" in out
    assert "segments (ours)" in out and "token-major (stock)" in out


def test_cli_explicit_shape_and_gpu_overrides(capsys):
    argv = ["plan", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--q-heads", "32",
            "--hidden-size", "4096", "--intermediate-size", "14336", "--context", "32768",
            "--new-tokens", "2048", "--gpu", "h200", "--gpu-tflops", "989", "--hbm-tbps", "4.8", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"]["hbm_bandwidth"] == 4.8e12
    assert rel(out["t_layer_ms"], 4.1) < 0.03


def test_cli_hf_config(tmp_path, capsys):
    path = write_config(tmp_path, LLAMA_8B_CONFIG)
    assert cli.main(["plan", "--hf-config", str(path), "--context", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_bytes"] == 256 * 4096 * 32


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "--model", "gpt-5", "--context", "10"],
         "known models: llama-3.1-70b, llama-3.1-8b, qwen3-32b"),
        (["plan", "--model", "llama-3.1-8b", "--context", "-5"], "must be >= 0"),
        (["plan", "--model", "llama-3.1-8b", "--context", "10", "--new-tokens", "0"], "must be >= 1"),
        (["plan", "--model", "llama-3.1-8b", "--context", "10", "--bandwidth-gbps", "-1"], "must be > 0"),
        (["plan", "--model", "llama-3.1-8b", "--context", "10", "--bandwidth-gbps", "inf"], "finite"),
        (["plan", "--hf-config", "/nonexistent/config.json", "--context", "10"], "cannot read"),
        (["plan", "--model", "llama-3.1-8b", "--layers", "3", "--context", "10"], "exactly one model"),
        (["plan", "--context", "10"], "exactly one model"),
        (["plan", "--layers", "3", "--kv-heads", "1", "--head-dim", "8", "--q-heads", "1",
          "--context", "10"], "parameters per layer"),
        (["plan", "--model", "llama-3.1-8b", "--context", "10", "--prices", "custom"], "--put-per-1k"),
        (["plan", "--model", "llama-3.1-8b", "--context", "10", "--gpu", "tpu"], "known GPUs"),
        (["plan", "--model", "llama-3.1-8b", "--context", "10", "--efficiency", "2"], "efficiency"),
        (["plan", "--model", "llama-3.1-8b", "--context", "10", "--kv-dtype", "int3"], "unknown dtype"),
        (["plan", "--model", "llama-3.1-8b"], "--context"),
        ([], "COMMAND"),
    ],
)
def test_cli_bad_input_exits_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_cli_registers_the_operator_commands():
    assert {"plan", "inspect", "gc", "server", "bench"} <= set(cli.all_commands())


def test_one_million_tokens_of_8b_store_in_under_2200_puts():
    """Format v2's point: pointers were 2/3 of a store's PUTs (a pointer per chunk)."""
    pl = planner.plan(L8B, context_tokens=1_000_000, new_tokens=256)
    d = pl.ours.detail
    assert (d["chunks"], d["segments"]) == (3907, 62)  # 61 full segments of 64 chunks + 3 chunks
    assert pl.put_requests == 62 * 32 + 62 + 62 == 2108 <= 2200


# --- the staging budget ---------------------------------------------------------------------


def test_staging_budget_covers_the_latency_tail_and_grows_with_jitter(capsys):
    # 1,024 tokens of 8B (4 MiB layers) over a 4.4 Gbps link (7.6 ms a layer) at 50 +- 20 ms,
    # a short step: a layer is in flight up to 50 + 20 + 7.6 ms while one leaves every 7.6 ms
    link = LinkSpec(bandwidth_gbps=4.4, latency_ms=50, jitter_ms=20)
    p = planner.plan(L8B, context_tokens=1024, new_tokens=16, link=link)
    layer = 1024 * 4096
    step = layer / link.bytes_per_s
    assert p.staging_budget_bytes == (math.ceil((0.070 + step) / step) + 1) * layer
    steady = planner.plan(L8B, context_tokens=1024, new_tokens=16, link=replace(link, jitter_ms=0))
    assert steady.staging_budget_bytes < p.staging_budget_bytes <= 32 * layer
    assert p.to_dict()["staging_budget_bytes"] == p.staging_budget_bytes
    assert planner.plan(L8B, context_tokens=0, new_tokens=16, link=link).staging_budget_bytes == 0
    with pytest.raises(PlannerError, match="jitter"):
        LinkSpec(jitter_ms=-1)
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--context", "1024", "--new-tokens", "16",
                     "--bandwidth-gbps", "4.4", "--latency-ms", "50", "--jitter-ms", "20"]) == 0
    out = capsys.readouterr().out
    assert "50 ± 20 ms first byte" in out and "staging budget needed    48.00 MiB" in out
