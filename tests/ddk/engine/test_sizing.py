"""``ddk.engine.sizing``: the config arithmetic against instantiated tiny models, the activation and
weight-copy formulas against what autograd saves, and every memory and FLOP term on a case
computed by hand."""

from __future__ import annotations

import pytest
import torch

from ddk.engine.sizing import (
    GIB,
    PLACEMENTS,
    ModelShape,
    Workload,
    estimate_memory,
    flops_per_token,
)

transformers = pytest.importorskip("transformers")


def _config(family: str, **kw):  # type: ignore[no-untyped-def]
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[family]
    base = dict(
        vocab_size=300,
        hidden_size=80,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    base.update(kw)
    return cls(**base)


def _model(config):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model


CONFIGS = {
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-head-dim": ("llama", dict(head_dim=24, num_attention_heads=5, num_key_value_heads=1)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "mistral": ("mistral", dict(num_key_value_heads=1)),
}


@pytest.mark.parametrize("case", CONFIGS, ids=list(CONFIGS))
def test_model_shape_parameters_equal_the_instantiated_model(case: str) -> None:
    family, kw = CONFIGS[case]
    config = _config(family, **kw)
    model = _model(config)
    shape = ModelShape.from_config(config)
    assert shape.tied == bool(kw.get("tie_word_embeddings", False))
    assert shape.parameters == sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    assert shape.block_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.output_params == model.lm_head.weight.numel()
    matmuls = [m for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    assert shape.block_matmul_params == sum(m.weight.numel() for m in matmuls)


def _saved_bytes(model, micro_batch: int, seq_len: int) -> int:  # type: ignore[no-untyped-def]
    """Bytes of every storage autograd saves in the decoder's forward under CPU bfloat16 autocast
    (the parameters themselves left out; each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.model(input_ids=ids)
    return sum(saved.values())


@pytest.mark.parametrize("case", ["llama-untied", "llama-head-dim", "qwen2-untied", "mistral"])
def test_activation_and_weight_copy_formulas_equal_what_autograd_saves(case: str) -> None:
    family, kw = CONFIGS[case]
    config = _config(family, num_hidden_layers=3, **kw)
    shape = ModelShape.from_config(config)
    b, seq = 3, 37  # b * seq equal to no weight dimension
    copies = 2 * shape.layers * shape.block_matmul_params  # autocast's bfloat16 weights, kept for backward
    assert _saved_bytes(_model(config), b, seq) == shape.activation_bytes(b, seq) + copies


def test_activation_formula_with_checkpointing_is_the_layer_inputs_plus_one_recomputed_layer() -> None:
    config = _config("llama", num_hidden_layers=3)
    shape = ModelShape.from_config(config)
    model = _model(config)
    model.activation_checkpointing_enable()
    model.train()
    b, seq = 3, 37
    one = ModelShape.from_config(_config("llama", num_hidden_layers=1))
    one_layer = one.activation_bytes(b, seq) - b * seq * (8 * one.hidden + 12)  # a layer and the rotary tables
    kept = _saved_bytes(model, b, seq)  # the checkpoints: each layer's float32 input, the ids, the final norm
    assert kept == b * seq * (3 * 4 * 80 + 8 * 80 + 12)
    assert shape.activation_bytes(b, seq, checkpointing=True) == kept + one_layer


# A hand-computed case: teacher h=96, f=192, 3 layers, 6 heads of 16 (no GQA), V=1008;
# student h=64, f=128, 2 layers, 4 heads and 2 kv heads of 16, V=1000; both untied.
T = ModelShape(vocab=1008, hidden=96, intermediate=192, layers=3, heads=6, kv_heads=6, head_dim=16)
S = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16)
S_BLOCK_MM = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o; k, v; gate, up, down = 36864
S_BLOCK = S_BLOCK_MM + 2 * 64  # + two RMSNorm weights = 36992
S_ROOT = 2 * 1000 * 64 + 64  # embedding, output layer, final norm = 128064
S_PARAMS = 2 * S_BLOCK + S_ROOT  # 202048
T_BLOCK = 4 * 96 * 96 + 3 * 96 * 192 + 2 * 96  # 92352
T_PARAMS = 3 * T_BLOCK + 2 * 1008 * 96 + 96  # 470688
W = Workload(gpus=4, micro_batch=2, seq_len=8, top_k=5, fused_workspace_bytes=1000)
N = 16  # tokens per micro-batch


def test_hand_computed_shapes() -> None:
    assert (S.block_matmul_params, S.block_params, S.root_params, S.parameters) == (36864, 36992, 128064, 202048)
    assert (T.block_params, T.parameters) == (92352, 470688)
    assert (S_BLOCK_MM, S_BLOCK, S_ROOT, S_PARAMS, T_BLOCK, T_PARAMS) == (36864, 36992, 128064, 202048, 92352, 470688)


def test_estimate_memory_hand_computed_terms() -> None:
    layer = 26 * 64 + 4 * 64 + 4 * 32 + 8 * 128 + 4 * 4 + 8  # 3096 bytes per token and layer
    activations = N * (2 * layer + 8 * 64 + 12) + 8 * 8 * 16  # 16 * 6716 + 1024 = 108480
    loss_fused = 1000 + 8 * 1000 * 64 + 6 * N * 64 + 2 * N * 96  # workspace, dW/W copies, hidden states
    loss_logits = 2 * N * (2 * 1000 + 1008) + 2 * N * 64 + 2 * 1000 * 64

    rep = estimate_memory(T, S, W, "replicated")
    assert rep.teacher_resident == 2 * T_PARAMS
    assert rep.teacher_gathered == 0 and rep.teacher_host == 0 and rep.cache_batch == 0
    assert rep.teacher_working == N * (6 * 192 + 8 * 96)
    assert rep.student_states == 16 * S_PARAMS // 4  # FSDP2 over 4 ranks: weights, grads, AdamW moments
    # FSDP2's gathered peak: the root group, and its all-gather buffer still held while the first
    # block's is gathered (S_ROOT > S_BLOCK), or two blocks; one block's and the output layer's gradients
    peak = S_ROOT + max(S_ROOT + S_BLOCK, 2 * S_BLOCK)
    assert S_ROOT > S_BLOCK and peak == 2 * S_ROOT + S_BLOCK
    assert rep.student_gathered == 4 * (peak + S_BLOCK) + 4 * 1000 * 64
    assert rep.weight_copies == 2 * 2 * S_BLOCK_MM
    assert rep.activations == activations == 108480
    assert (rep.loss_fused, rep.loss_logits) == (loss_fused, loss_logits)
    assert (
        rep.total("fused")
        == (rep.teacher_resident + rep.teacher_working + rep.student_states + rep.student_gathered)
        + rep.weight_copies
        + activations
        + loss_fused
    )
    assert rep.total("logits") - rep.total("fused") == loss_logits - loss_fused

    fsdp = estimate_memory(T, S, W, "fsdp")
    assert fsdp.teacher_resident == 2 * T_PARAMS // 4
    t_root = 2 * 1008 * 96 + 96  # embedding, output layer, final norm
    assert fsdp.teacher_gathered == 2 * (t_root + max(t_root + T_BLOCK, 2 * T_BLOCK))

    # --teacher-offload cpu: the shards in host memory; on the GPU the same gathered groups plus the
    # host-to-device copy of the shard being gathered (a block's while the blocks run)
    off = estimate_memory(T, S, W, "cpu_offload")
    assert off.teacher_resident == 0 and off.teacher_gathered == fsdp.teacher_gathered + 2 * T_BLOCK // 4
    assert off.teacher_host == 2 * T_PARAMS // 4
    # one rank: the whole block's shard copied
    one = estimate_memory(S, S, Workload(gpus=1, micro_batch=2, seq_len=8), "cpu_offload")
    assert one.teacher_gathered == 2 * (2 * S_ROOT + S_BLOCK) + 2 * S_BLOCK

    cache = estimate_memory(T, S, W, "cache")
    assert cache.teacher_resident == cache.teacher_gathered == cache.teacher_working == 0
    assert cache.cache_batch == N * (5 * 8 + 5 * 4 + 4)  # int64 ids, float32 log-probs, float32 tail
    assert cache.cache_disk_per_token == 4 + 4 * 5 + 2 * 5 + 4 + 4
    assert cache.loss_logits == 4 * N * 1000 + 2 * N * 64 + 2 * 1000 * 64
    assert cache.loss_fused == 3 * 4 * N * 1008 + 8 * 1000 * 64 + 6 * N * 64  # a workspace no larger than the batch
    big = estimate_memory(T, S, Workload(gpus=4, micro_batch=64, seq_len=2048, top_k=5), "cache")
    assert big.loss_fused == (128 << 20) + 8 * 1000 * 64 + 6 * 64 * 2048 * 64  # the sparse loss's 128 MiB cap


def test_estimate_memory_ddp_student_and_checkpointing() -> None:
    ddp = estimate_memory(T, S, Workload(gpus=4, micro_batch=2, seq_len=8, student="ddp"))
    assert ddp.student_states == 20 * S_PARAMS and ddp.student_gathered == 0  # + DDP's gradient buckets
    one = estimate_memory(T, S, Workload(gpus=1, micro_batch=2, seq_len=8, student="ddp"))
    assert one.student_states == 16 * S_PARAMS  # one process: no DDP wrapper
    ck = estimate_memory(T, S, Workload(gpus=4, micro_batch=2, seq_len=8, checkpointing=True))
    layer = 26 * 64 + 4 * 64 + 4 * 32 + 8 * 128 + 4 * 4 + 8
    assert ck.activations == N * (2 * 4 * 64 + layer + 8 * 64 + 12) + 8 * 8 * 16
    assert ck.weight_copies == 2 * S_BLOCK_MM  # one block recomputed at a time


def test_estimate_memory_data_parallel_terms_shrink_with_gpus() -> None:
    a, b = (estimate_memory(T, S, Workload(gpus=r), "fsdp") for r in (2, 8))
    assert a.teacher_resident == 4 * b.teacher_resident and a.student_states == 4 * b.student_states
    assert (a.activations, a.loss_fused, a.weight_copies) == (b.activations, b.loss_fused, b.weight_copies)


def test_flops_per_token_hand_computed() -> None:
    seq = 8
    t_fwd = 2 * (3 * (4 * 96 * 96 + 3 * 96 * 192) + 1008 * 96) + 2 * 3 * seq * 96
    s_fwd = 2 * (2 * S_BLOCK_MM + 1000 * 64) + 2 * 2 * seq * 64
    f = flops_per_token(T, S, seq)
    assert (f.teacher_forward, f.student_forward_backward) == (t_fwd, 3 * s_fwd)
    assert (f.teacher_output_layer, f.student_output_layer) == (2 * 1008 * 96, 6 * 1000 * 64)
    assert f.total == t_fwd + 3 * s_fwd
    assert flops_per_token(T, S, seq, cache=True).total == 3 * s_fwd
    assert flops_per_token(T, S, seq, checkpointing=True).student_forward_backward == 4 * s_fwd - 2 * 1000 * 64


def test_estimates_take_transformers_configs() -> None:
    t, s = _config("qwen2", vocab_size=320), _config("qwen2")
    est = estimate_memory(t, s, Workload(), "fsdp")
    assert est == estimate_memory(ModelShape.from_config(t), ModelShape.from_config(s), Workload(), "fsdp")
    assert 0 < est.total("fused") < GIB * 2
    assert {estimate_memory(t, s, Workload(), p).placement for p in PLACEMENTS} == set(PLACEMENTS)


def test_sizing_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"estimate_memory: placement must be one of .*; got 'gpu'\."):
        estimate_memory(T, S, W, "gpu")
    with pytest.raises(
        ValueError, match=r"teacher's vocabulary must be at least the student's; got teacher 1000, student 1008"
    ):
        estimate_memory(S, T, W)
    with pytest.raises(
        TypeError, match=r"estimate_memory: teacher must be a ModelShape or a transformers config; got int"
    ):
        estimate_memory(3, S, W)
    with pytest.raises(TypeError, match=r"estimate_memory: workload must be a Workload; got dict"):
        estimate_memory(T, S, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Workload: gpus must be a positive int; got 0\."):
        Workload(gpus=0)
    with pytest.raises(ValueError, match=r"Workload: student must be one of \('fsdp', 'ddp'\); got 'zero3'\."):
        Workload(student="zero3")
    with pytest.raises(ValueError, match=r"flops_per_token: seq_len must be a positive int; got 0\."):
        flops_per_token(T, S, 0)
    with pytest.raises(ValueError, match=r"MemoryEstimate.total: loss must be 'fused' or 'logits'; got 'sparse'\."):
        estimate_memory(T, S, W).total("sparse")
    gpt2 = transformers.GPT2Config()
    with pytest.raises(
        ValueError, match=r"ModelShape.from_config: config must be a transformers config of .*model_type 'gpt2'"
    ):
        ModelShape.from_config(gpt2)
