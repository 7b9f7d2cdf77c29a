"""Sizing on paper: parameters, per-GPU memory and FLOPs of one distillation step, from configs alone.

Nothing here loads weights or allocates a tensor: give it the ``transformers`` configs of a
teacher and a student (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``; a saved model's
``AutoConfig.from_pretrained(folder)``) and a :class:`Workload`, and it returns the bytes each GPU
holds under each teacher placement and the FLOPs per token.

What it models is what ``ddk distill`` does (``--dtype bf16``, the CUDA default):

* **the student** keeps float32 master weights (``load_models``), float32 gradients and AdamW's
  two float32 moments (``make_optimizer``): 16 bytes per parameter, divided by R under FSDP2
  (``--fsdp``); under DDP every rank holds them and DDP's gradient buckets (a second copy of
  the gradients, ``gradient_as_bucket_view=False``): 20 bytes per parameter. FSDP2 also holds,
  in float32, what it has gathered: the root group (``fully_shard(step)``: embedding, final
  norm, output layer), whose forward is the whole step, gathered through the forward and again
  through the backward; and either the root group's all-gather buffer, still held while the
  first block is gathered, with that block's buffer, or two blocks (the one computing and the
  one prefetched): ``root + max(root + block, 2 block)`` parameters (measured by
  ``bench/shard_teacher.py``); plus the unsharded gradient of one block and the output layer's
  (the first of the backward; the embedding's comes last, when the activations are gone).
* **autocast's bfloat16 weight copies**: every ``nn.Linear`` under autocast casts its float32
  weight to bfloat16 and keeps that copy for backward, so the autograd graph holds 2 bytes per
  block matmul parameter from forward to backward, sharded or not (one block's with activation
  checkpointing, which recomputes one block at a time).
* **activations** of one micro-batch of ``n = micro_batch * seq_len`` tokens (what autograd keeps
  for backward; Llama/Mistral/Qwen2 decoder blocks, SDPA attention, no dropout, float32 residual
  stream under bfloat16 autocast), per token and layer
  ``26 h + 4 q + 4 kv + 8 f + 4 heads + 8`` bytes (``h`` hidden, ``q``/``kv`` the query and
  key/value widths, ``f`` intermediate), plus ``8 h + 12`` for the ids and the final norm and
  ``8 * seq_len * head_dim`` for the rotary tables. With activation checkpointing the layers keep
  their float32 input (``4 h``) and one layer is recomputed at a time. This formula equals, byte
  for byte, the tensors autograd saves in tiny Llama and Qwen2 models on the CPU (tested); CUDA's
  attention kernels may save slightly differently.
* **the teacher** in bfloat16, frozen (no gradient, no optimizer state), placed one of
  :data:`PLACEMENTS`: ``"replicated"`` (2 bytes per parameter on every GPU; what ``ddk distill``
  does without ``--fsdp``), ``"fsdp"`` (what ``--fsdp`` does, ``ddk.engine.parallel.shard_teacher``:
  ``2 N_t / R`` on each rank, plus what FSDP2 holds gathered at once, as for the student:
  ``root_t + max(root_t + b_t, 2 b_t)`` parameters (``b_t`` one block's, ``root_t`` the
  embedding, final norm and output layer, gathered from the teacher's forward until the loss
  has read the output layer)), ``"cpu_offload"`` (what ``--fsdp --teacher-offload cpu`` does:
  FSDP2's ``CPUOffloadPolicy`` on the same groups, so the shards, ``2 N_t / R`` bytes, sit in
  host memory, pinned under NCCL, and the GPU holds the same gathered groups, plus the
  host-to-device copy of the shard of the block being gathered, which FSDP2 copies into the
  all-gather buffer and frees: ``2 b_t / R``), ``"cache"``
  (the offline top-k cache of ``ddk teacher-cache``, ``--teacher-cache``: no teacher at all; the
  batch carries ``k`` ids, ``k`` log-probabilities and the tail per token,
  ``ddk.data.bytes_per_token(k)`` bytes per token on disk). Its no-grad forward needs a working set of about ``n (6 f_t + 8 h_t)`` bytes
  (an estimate: three ``(n, f_t)`` bfloat16 MLP tensors and the float32 norm temporaries).
* **the loss**: the logits path keeps the student's and the teacher's ``(n, V)`` bfloat16 logits
  and allocates the student's logit gradient, ``2 n (2 V + V_t)`` bytes, plus the bfloat16 hidden
  states and output weight it saves (``2 n h_s + 2 V h_s``); with a teacher cache
  ``4 n V + 2 n h_s + 2 V h_s``. The fused loss allocates no ``(n, V)`` tensor: its workspace
  (``ddk_kernels.fused_plan``: on CUDA the gemm strategy, ``min(max(free / 16, 64 MiB), 1 GiB)``;
  the sparse loss of a cache 128 MiB), a float32 weight-gradient accumulator and the bfloat16
  copies of the weight and its gradient (``8 V h_s``), and the hidden states and their gradient
  (``6 n h_s``, plus the teacher's ``2 n h_t``).

Not counted: the CUDA context, NCCL buffers, the caching allocator's fragmentation, the
validation passes (no gradients; smaller than a training step) and the data loader.

FLOPs per token (:func:`flops_per_token`): 2 per matmul parameter and token forward, 6 forward
and backward (8 with activation checkpointing, which runs the blocks' forward twice), the output
layer included (``2 V h`` forward); causal attention adds ``2 seq_len q`` per layer forward
(scores and weighted sum, half of the square). The teacher runs forward only; from a cache, not
at all. DDK's validation passes every K steps are not counted (the paper: ~0.7% over KD).

Examples:
    >>> s = ModelShape(vocab=100, hidden=16, intermediate=32, layers=2, heads=4, kv_heads=2, head_dim=4)
    >>> s.block_params, s.parameters  # 2*16*16 + 2*16*8 + 3*16*32 + 2*16; 2 * 2336 + 2*100*16 + 16
    (2336, 7888)
    >>> round(estimate_memory(s, s, Workload(gpus=2), "fsdp").total("fused") / GIB, 3)
    0.026
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "FAMILIES",
    "GIB",
    "PLACEMENTS",
    "FlopsEstimate",
    "MemoryEstimate",
    "ModelShape",
    "Workload",
    "estimate_memory",
    "flops_per_token",
]

GIB = 1 << 30  #: bytes in a GiB, the unit of the tables
FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2")  #: ``config.model_type`` values understood
Placement = Literal["replicated", "fsdp", "cpu_offload", "cache"]
PLACEMENTS: tuple[Placement, ...] = ("replicated", "fsdp", "cpu_offload", "cache")  #: where the teacher lives
_SHARDINGS = ("fsdp", "ddp")
_SPARSE_WORKSPACE = 128 << 20  # ddk_kernels.sparse: the chunk budget of the cached (top-k) losses
_FLOAT32, _BF16 = 4, 2


def _positive_int(fn: str, name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive int; got {value!r}.")
    return value


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-style decoder (Llama, Mistral, Qwen2): what the arithmetic needs.

    Attributes:
        vocab: output rows ``V`` (``config.vocab_size``, padding rows included).
        hidden: ``h``; intermediate: ``f`` (SwiGLU MLP); layers: decoder blocks.
        heads, kv_heads, head_dim: attention heads, key/value heads (GQA), width of one head.
        tied: the output layer is the embedding (counted once).
        qkv_bias, o_bias, mlp_bias: which projections have a bias (Qwen2: q, k, v).
    """

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a ``transformers`` config of one of :data:`FAMILIES` (no weights are read).

        Raises:
            ValueError: another ``model_type`` (the arithmetic is only checked for these blocks).
        """
        kind = getattr(config, "model_type", None)
        if kind not in FAMILIES:
            raise ValueError(
                f"ModelShape.from_config: config must be a transformers config of {FAMILIES} (model_type); "
                f"got {type(config).__name__} with model_type {kind!r}. Build a ModelShape by hand for other decoders."
            )
        heads = int(config.num_attention_heads)
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            vocab=int(config.vocab_size),
            hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or attention_bias,
            o_bias=kind == "llama" and attention_bias,
            mlp_bias=kind == "llama" and bool(getattr(config, "mlp_bias", False)),
        )

    @property
    def q_dim(self) -> int:
        """Width of the queries, ``heads * head_dim``."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values), ``kv_heads * head_dim``."""
        return self.kv_heads * self.head_dim

    @property
    def block_matmul_params(self) -> int:
        """Weights of one block's matmuls: q, k, v, o and the three MLP projections."""
        h, f = self.hidden, self.intermediate
        return 2 * h * self.q_dim + 2 * h * self.kv_dim + 3 * h * f

    @property
    def block_params(self) -> int:
        """Every parameter of one block: the matmuls, their biases and the two RMSNorm weights."""
        h, f = self.hidden, self.intermediate
        bias = (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + h * self.o_bias + (2 * f + h) * self.mlp_bias
        return self.block_matmul_params + bias + 2 * h

    @property
    def output_params(self) -> int:
        """The output layer's weight ``V * h`` (a matmul even when tied)."""
        return self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """Outside the blocks: embedding, final norm and (untied) output layer."""
        return self.output_params * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        """All parameters, a tied output layer once: ``sum(p.numel() for p in model.parameters())``."""
        return self.layers * self.block_params + self.root_params

    @property
    def matmul_params(self) -> int:
        """Parameters that multiply each token (2 FLOPs each forward): the blocks' and the output layer's."""
        return self.layers * self.block_matmul_params + self.output_params

    def activation_bytes(self, micro_batch: int, seq_len: int, checkpointing: bool = False) -> int:
        """Bytes autograd keeps for backward in one micro-batch (see the module docstring)."""
        h = self.hidden
        layer = 26 * h + 4 * self.q_dim + 4 * self.kv_dim + 8 * self.intermediate + 4 * self.heads + 8
        per_token = (self.layers * 4 * h + layer if checkpointing else self.layers * layer) + 8 * h + 12
        return micro_batch * seq_len * per_token + 8 * seq_len * self.head_dim


@dataclass(frozen=True)
class Workload:
    """What one GPU runs.

    Attributes:
        gpus: R, the ranks (GPUs) of the run, all nodes together.
        micro_batch: sequences per GPU per micro-batch.
        seq_len: tokens per sequence.
        student: ``"fsdp"`` (``--fsdp``) or ``"ddp"``.
        checkpointing: activation checkpointing of the student (``--gradient-checkpointing``).
        top_k: entries per token of the offline teacher cache.
        fused_workspace_bytes: the fused loss's tile workspace (its CUDA cap, 1 GiB, by default); a
            small batch uses less (three float32 ``(n, V)`` blocks at most).
    """

    gpus: int = 16
    micro_batch: int = 4
    seq_len: int = 2048
    student: str = "fsdp"
    checkpointing: bool = False
    top_k: int = 32
    fused_workspace_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("gpus", "micro_batch", "seq_len", "top_k", "fused_workspace_bytes"):
            _positive_int("Workload", name, getattr(self, name))
        if self.student not in _SHARDINGS:
            raise ValueError(f"Workload: student must be one of {_SHARDINGS}; got {self.student!r}.")

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one GPU, ``n = micro_batch * seq_len``."""
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU (and in host memory and on disk) for one placement of the teacher.

    Attributes:
        placement: one of :data:`PLACEMENTS`.
        teacher_resident: the teacher's weights kept on the GPU (all, or this rank's shard; none offloaded).
        teacher_gathered: the peak FSDP2 holds gathered, ``root + max(root + block, 2 block)``
            (sharded placements; offloaded, with the host-to-device copy of a block's shard).
        teacher_working: the no-grad forward's temporaries (0 with a cache).
        cache_batch: the cached top-k batch on the GPU (``"cache"`` only).
        student_states: weights, gradients and AdamW moments (and DDP's buckets).
        student_gathered: FSDP2's gathered peak (as the teacher's), one block's and the output
            layer's unsharded gradients.
        weight_copies: autocast's bfloat16 copies of the block weights kept for backward.
        activations: what the student's blocks keep for backward.
        loss_fused, loss_logits: the loss's own memory on each path.
        teacher_host: host memory per rank for the teacher's shards (``"cpu_offload"``, after
            ``fully_shard``; at load time every rank maps the whole teacher, see ``docs/guides/scale.md``).
        cache_disk_per_token: bytes per token of the cache on disk (``"cache"``).
    """

    placement: str
    teacher_resident: int
    teacher_gathered: int
    teacher_working: int
    cache_batch: int
    student_states: int
    student_gathered: int
    weight_copies: int
    activations: int
    loss_fused: int
    loss_logits: int
    teacher_host: int
    cache_disk_per_token: int

    @property
    def teacher(self) -> int:
        """Everything of the teacher on the GPU (with the cache: the cached batch)."""
        return self.teacher_resident + self.teacher_gathered + self.teacher_working + self.cache_batch

    @property
    def student(self) -> int:
        """The student's states, gathered blocks and weight copies (no activations)."""
        return self.student_states + self.student_gathered + self.weight_copies

    def total(self, loss: str = "fused") -> int:
        """Peak bytes on one GPU with the ``"fused"`` or ``"logits"`` loss (every term at once)."""
        if loss not in ("fused", "logits"):
            raise ValueError(f"MemoryEstimate.total: loss must be 'fused' or 'logits'; got {loss!r}.")
        return (
            self.teacher + self.student + self.activations + (self.loss_fused if loss == "fused" else self.loss_logits)
        )


def _shape(fn: str, name: str, model: Any) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if hasattr(model, "model_type"):
        return ModelShape.from_config(model)
    raise TypeError(f"{fn}: {name} must be a ModelShape or a transformers config; got {type(model).__name__}.")


def _gathered_peak(m: ModelShape) -> int:
    """Parameters FSDP2 holds gathered at once in a forward (bench/shard_teacher.py measures it): the
    root group (embeddings, final norm, output layer) from the first forward on, and either its
    all-gather buffer, still held while the first block is gathered, with that block's buffer,
    or two blocks (the one computing and the one prefetched): ``root + max(root + block, 2 block)``."""
    return m.root_params + max(m.root_params + m.block_params, 2 * m.block_params)


def estimate_memory(teacher: Any, student: Any, workload: Workload, placement: str = "replicated") -> MemoryEstimate:
    """Bytes one GPU holds at the peak of a step (the module docstring states every term).

    Args:
        teacher: a ``ModelShape`` or a ``transformers`` config (Llama, Mistral, Qwen2).
        student: the same for the student; its vocabulary must not exceed the teacher's.
        workload: GPUs, micro-batch, sequence length, student sharding, ...
        placement: where the teacher lives, one of :data:`PLACEMENTS`.

    Returns:
        ``MemoryEstimate``; ``.total("fused")`` and ``.total("logits")`` are the per-GPU peaks.

    Examples:
        >>> s = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, head_dim=16)
        >>> est = estimate_memory(s, s, Workload(gpus=1, micro_batch=1, seq_len=8, student="ddp"))
        >>> est.student_states == 16 * s.parameters  # one process: no DDP buckets
        True
    """
    fn = "estimate_memory"
    t, s = _shape(fn, "teacher", teacher), _shape(fn, "student", student)
    if not isinstance(workload, Workload):
        raise TypeError(f"{fn}: workload must be a Workload; got {type(workload).__name__}.")
    if placement not in PLACEMENTS:
        raise ValueError(f"{fn}: placement must be one of {PLACEMENTS}; got {placement!r}.")
    if s.vocab > t.vocab:
        raise ValueError(
            f"{fn}: the teacher's vocabulary must be at least the student's; got teacher {t.vocab}, student {s.vocab}."
        )
    r, n = workload.gpus, workload.tokens
    sharded_teacher = placement in ("fsdp", "cpu_offload")
    cache = placement == "cache"

    teacher_resident = 0  # cpu_offload: the shard is in host memory; cache: no teacher
    if placement == "replicated":
        teacher_resident = _BF16 * t.parameters
    elif placement == "fsdp":
        teacher_resident = math.ceil(_BF16 * t.parameters / r)
    teacher_gathered = _BF16 * _gathered_peak(t) if sharded_teacher else 0
    if placement == "cpu_offload":  # plus the host-to-device copy of the shard of the block being gathered
        teacher_gathered += _BF16 * math.ceil(t.block_params / r)
    teacher_working = 0 if cache else n * (6 * t.intermediate + 8 * t.hidden)
    cache_batch = n * (12 * workload.top_k + 4) if cache else 0  # int64 ids, float32 log-probs, float32 tail

    if workload.student == "fsdp":
        student_states = math.ceil(16 * s.parameters / r)
        student_gathered = _FLOAT32 * (_gathered_peak(s) + s.block_params + s.output_params)
    else:
        student_states = (16 + (4 if r > 1 else 0)) * s.parameters
        student_gathered = 0
    weight_copies = _BF16 * s.block_matmul_params * (1 if workload.checkpointing else s.layers)
    activations = s.activation_bytes(workload.micro_batch, workload.seq_len, workload.checkpointing)

    v, hs = s.vocab, s.hidden
    # a workspace is a cap: the tiles never hold more than three float32 (n, V) blocks of the batch
    whole = 3 * _FLOAT32 * n * max(v, t.vocab)
    if cache:
        loss_logits = 4 * n * v + 2 * n * hs + 2 * v * hs
        loss_fused = min(_SPARSE_WORKSPACE, whole) + 8 * v * hs + 6 * n * hs
    else:
        loss_logits = 2 * n * (2 * v + t.vocab) + 2 * n * hs + 2 * v * hs
        loss_fused = min(workload.fused_workspace_bytes, whole) + 8 * v * hs + 6 * n * hs + 2 * n * t.hidden
    return MemoryEstimate(
        placement=placement,
        teacher_resident=teacher_resident,
        teacher_gathered=teacher_gathered,
        teacher_working=teacher_working,
        cache_batch=cache_batch,
        student_states=student_states,
        student_gathered=student_gathered,
        weight_copies=weight_copies,
        activations=activations,
        loss_fused=loss_fused,
        loss_logits=loss_logits,
        teacher_host=math.ceil(_BF16 * t.parameters / r) if placement == "cpu_offload" else 0,
        cache_disk_per_token=12 + 6 * workload.top_k if cache else 0,  # ddk.data.bytes_per_token(k)
    )


@dataclass(frozen=True)
class FlopsEstimate:
    """FLOPs per trained token of one step.

    Attributes:
        teacher_forward: the teacher's forward (0 from a cache).
        student_forward_backward: the student's forward and backward (and recomputation).
        teacher_output_layer, student_output_layer: of which the output layers (``2 V h_t``,
            ``6 V h_s``): the part the fused loss computes.
    """

    teacher_forward: int
    student_forward_backward: int
    teacher_output_layer: int
    student_output_layer: int

    @property
    def total(self) -> int:
        """FLOPs per token of the whole step."""
        return self.teacher_forward + self.student_forward_backward


def flops_per_token(
    teacher: Any, student: Any, seq_len: int, *, checkpointing: bool = False, cache: bool = False
) -> FlopsEstimate:
    """FLOPs per token of one step: teacher forward ``2 N_t`` (none from a ``cache``), student
    forward and backward ``6 N_s`` (``N``: matmul parameters, output layer included), plus causal
    attention ``2 seq_len q`` per layer forward; with ``checkpointing`` the student's blocks run
    their forward twice.

    Examples:
        >>> s = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, head_dim=16)
        >>> f = flops_per_token(s, s, 8)
        >>> f.student_forward_backward == 3 * f.teacher_forward
        True
    """
    fn = "flops_per_token"
    t, s = _shape(fn, "teacher", teacher), _shape(fn, "student", student)
    _positive_int(fn, "seq_len", seq_len)

    def forward(m: ModelShape) -> int:
        return 2 * m.matmul_params + 2 * m.layers * seq_len * m.q_dim

    blocks_forward = forward(s) - 2 * s.output_params
    student = 3 * forward(s) + (blocks_forward if checkpointing else 0)
    return FlopsEstimate(
        teacher_forward=0 if cache else forward(t),
        student_forward_backward=student,
        teacher_output_layer=0 if cache else 2 * t.output_params,
        student_output_layer=6 * s.output_params,
    )
