"""Build small random-weight models with a locally trained tokenizer: Llama (full attention, or
sliding-window + full through ``layer_types``), a GraniteMoeHybrid (Mamba-2 + attention) and a
DeepSeek-V2-shaped MLA config (weights from vLLM's dummy loader).

Tests, benchmarks and demos need a real model that vLLM can load, but these
machines cannot download from a model hub. Weights are random (so outputs are
gibberish) yet deterministic, which is all a KV-cache offloader needs: the KV
it saves and reloads must reproduce exactly what vLLM would have computed.

Builds are cached on disk under a directory named after the preset and a hash
of everything that shapes the result, so changing a preset rebuilds it, and
concurrent builders race safely (each builds into its own temporary directory
and only a complete build is renamed into place).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when the build procedure changes in a way the preset fields don't capture.
BUILD_VERSION = 1
CACHE_ENV = "KVBM_MODEL_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/kvbm/models")
_COMPLETE_MARKER = ".kvbm-build-complete"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)

# One turn per message, closed by EOS so generation stops at the end of a reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)


@dataclass(frozen=True)
class ModelPreset:
    """Architecture and tokenizer sizes of one buildable model."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    seed: int = 0
    corpus_sentences: int = 20000
    #: False: config and tokenizer only, for vLLM's ``load_format="dummy"`` (seeded random
    #: weights made on the GPU). An 8B-shaped model then costs seconds to build, not 16 GB.
    weights: bool = True
    #: Per-layer attention ("full_attention" / "sliding_attention", as in Hugging Face's
    #: ``layer_types``) for hybrid models; None: every layer full attention.
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None  # tokens, for the "sliding_attention" layers
    #: "llama", or "deepseek_v2" (MLA: one compressed latent KV per token, kv_lora_rank wide;
    #: dense MLP layers only, so no MoE kernels are needed). Config only: vLLM's dummy loader.
    architecture: str = "llama"
    kv_lora_rank: int | None = None
    #: Weight dtype of a built Mamba hybrid: float32 for exact CPU comparisons, bfloat16 on a GPU.
    hybrid_dtype: str = "float32"


PRESETS: dict[str, ModelPreset] = {
    # Weights load in milliseconds; for unit and integration tests.
    "test": ModelPreset(
        num_hidden_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=2048,
        max_position_embeddings=4096,
    ),
    # Large enough that a ~2,000-token prefill costs about a second on 2 CPU
    # cores, so skipping it by reloading offloaded KV is visible in demos.
    "demo": ModelPreset(
        num_hidden_layers=10,
        hidden_size=768,
        intermediate_size=2048,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=4096,
        max_position_embeddings=16384,
    ),
    # Sliding window + full attention (Gemma-3's 5:1 pattern, a 256-token window): vLLM's
    # hybrid KV-cache manager gives it two kinds of KV-cache group.
    "test-swa": ModelPreset(
        num_hidden_layers=6,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=2048,
        max_position_embeddings=4096,
        layer_types=("sliding_attention",) * 5 + ("full_attention",),
        sliding_window=256,
    ),
    # A Mamba-2 hybrid (Granite 4.0-H's architecture, dense MLPs): three Mamba layers, one
    # attention layer; vLLM's hybrid manager keeps the Mamba state per block in "align" mode.
    "test-mamba": ModelPreset(
        num_hidden_layers=4,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=2048,
        max_position_embeddings=4096,
        layer_types=("linear_attention", "full_attention", "linear_attention", "linear_attention"),
        architecture="granitemoehybrid",
    ),
    # GPU correctness runs: FlashAttention with head_dim 128, bf16, small enough to build in seconds.
    "gpu": ModelPreset(
        num_hidden_layers=4,
        hidden_size=1024,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=4096,
        max_position_embeddings=32768,
    ),
    # GPU correctness runs of a hybrid model: the 'gpu' shape with Gemma 3's 5:1 pattern of
    # sliding-window (512 tokens) and full-attention layers.
    "gpu-swa": ModelPreset(
        num_hidden_layers=6,
        hidden_size=1024,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=4096,
        max_position_embeddings=32768,
        layer_types=("sliding_attention",) * 5 + ("full_attention",),
        sliding_window=512,
    ),
    # GPU correctness runs of an MLA model: DeepSeek-V2-Lite's attention (kv_lora_rank 512,
    # 64 rope + 128 nope dims per head) on dense layers; random weights (built in seconds).
    "gpu-mla": ModelPreset(
        num_hidden_layers=4,
        hidden_size=1024,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=192,
        vocab_size=4096,
        max_position_embeddings=32768,
        architecture="deepseek_v2",
        kv_lora_rank=512,
    ),
    # GPU correctness runs of a Mamba hybrid: Granite 4.0-H's architecture (Mamba-2 layers with
    # attention every fourth layer, dense MLPs: no MoE kernels), bf16, head_dim 128.
    "gpu-mamba": ModelPreset(
        num_hidden_layers=8,
        hidden_size=1024,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=4096,
        max_position_embeddings=32768,
        layer_types=("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3 + ("full_attention",),
        architecture="granitemoehybrid",
        hybrid_dtype="bfloat16",
    ),
    # GPU performance runs: Llama-3.1-8B's shape (prefill cost and KV bytes per token are an
    # 8B model's: 128 KiB per token in bf16) with a small vocabulary; weights come from vLLM's
    # dummy loader (``--load-format dummy``).
    "llama8b-shape": ModelPreset(
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=8192,
        max_position_embeddings=65536,
        rope_theta=500000.0,
        weights=False,
    ),
}
# GPU performance runs of a hybrid model: the same 8B shape with Gemma 3's pattern (five
# sliding-window layers of 1,024 tokens to one full-attention layer: 27 windowed, 5 full).
PRESETS["llama8b-swa-shape"] = dataclasses.replace(
    PRESETS["llama8b-shape"],
    layer_types=tuple("full_attention" if i % 6 == 5 else "sliding_attention" for i in range(32)),
    sliding_window=1024,
)

# A small English-ish lexicon: real function words plus content words, padded
# with pronounceable made-up words so BPE has enough distinct merges to fill
# the requested vocabulary.
_FUNCTION_WORDS = (
    "the a an of to in on at for with from by about into over after before under "
    "and or but so because while if when then than that this these those it its "
    "he she they we you i me him her them us my your our their is are was were be "
    "been has have had do does did will would can could should may might must not no"
).split()
_CONTENT_WORDS = (
    "cache block memory disk host device layer token model prompt request server "
    "engine worker queue batch page table index value key tensor kernel thread "
    "process system network storage offload reload transfer copy write read save "
    "load hit miss evict policy pool buffer size time latency throughput speed "
    "river mountain city garden window morning evening winter summer music story "
    "letter market bridge station village forest ocean island harbor castle road "
    "people child teacher doctor farmer driver writer painter friend family "
    "quick slow bright dark quiet loud green blue small large old new early late "
    "happy careful simple strange gentle heavy light warm cold "
    "run walk speak think build open close start stop give take make find keep "
    "watch carry follow learn teach remember forget believe explain measure"
).split()
_ONSETS = tuple("b c d f g h k l m n p r s t v w br cl dr fl gr pl pr st str th tr sh ch".split())
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "io")
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt")
_SUFFIXES = ("", "", "", "s", "ed", "ing", "er", "ly", "tion", "ness", "ment", "able")


def _made_up_words(rng: random.Random, count: int) -> list[str]:
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.choices((1, 2, 3), (5, 4, 1))[0]
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        words.add(stem + rng.choice(_SUFFIXES))
    return sorted(words)


def _lexicon(seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    content = list(_CONTENT_WORDS) + _made_up_words(rng, 3000)
    return list(_FUNCTION_WORDS), content


def _sentences(seed: int) -> Iterator[str]:
    """Yield an endless, deterministic stream of English-ish sentences."""
    rng = random.Random(seed)
    function_words, content_words = _lexicon(seed)
    # Zipf-like weights so frequent words become single tokens, as in real text.
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) ** 0.8 for rank in range(len(content_words))))
    while True:
        words: list[str] = []
        for _ in range(rng.randint(5, 16)):
            if rng.random() < 0.4:
                words.append(rng.choice(function_words))
            else:
                words.append(rng.choices(content_words, cum_weights=cum_weights)[0])
        if rng.random() < 0.15:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        words[0] = words[0].capitalize()
        yield " ".join(words) + rng.choice((".", ".", ".", "?", "!", ","))


def generate_text(num_words: int, *, seed: int = 0) -> str:
    """Return deterministic English-ish text of about ``num_words`` words.

    Drawn from the same lexicon the tokenizers are trained on, so it tokenizes
    at about 2 tokens per word (1,000 words ~ 2,000 tokens); for prompts of a chosen length.
    """
    parts: list[str] = []
    count = 0
    for sentence in _sentences(seed + 1_000_003):
        parts.append(sentence)
        count += sentence.count(" ") + 1
        if count >= num_words:
            break
    return " ".join(parts)


def _config_hash(name: str, preset: ModelPreset) -> str:
    fields = dataclasses.asdict(preset)
    # Fields absent before, at their defaults, stay out: old builds keep their name.
    for newer, default in (("layer_types", None), ("sliding_window", None), ("architecture", "llama"),
                           ("kv_lora_rank", None), ("hybrid_dtype", "float32")):
        if fields[newer] == default:
            del fields[newer]
    payload = {"name": name, "build_version": BUILD_VERSION, **fields}
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def default_cache_dir() -> Path:
    """Return ``$KVBM_MODEL_CACHE`` or ``~/.cache/kvbm/models``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def model_dir_name(preset: str = "test") -> str:
    """Return the cache directory name for ``preset`` (changes with its config)."""
    return f"kvbm-llama-{preset}-{_config_hash(preset, _get_preset(preset))}"


def _get_preset(preset: str) -> ModelPreset:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file()


def _train_tokenizer(preset: ModelPreset, out_dir: Path) -> int:
    """Train a byte-level BPE tokenizer and save it for AutoTokenizer; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # Byte-level: any input text, including curl'd prompts, encodes without <unk>.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = _sentences(preset.seed)
    corpus = (next(sentences) for _ in range(preset.corpus_sentences))
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=preset.corpus_sentences)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    size = tokenizer.get_vocab_size()
    if size != preset.vocab_size:
        raise RuntimeError(
            f"tokenizer trained to {size} tokens, wanted {preset.vocab_size}; raise corpus_sentences for this preset"
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=preset.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return size


def _build_mla_config(preset: ModelPreset, out_dir: Path, special_ids: dict[str, int]) -> None:
    """A DeepSeek-V2-shaped model (MLA attention, every layer a dense MLP): random weights, or the
    config alone for vLLM's dummy loader (``weights=False``)."""
    from transformers import DeepseekV2Config, GenerationConfig

    config = DeepseekV2Config(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        moe_intermediate_size=preset.intermediate_size, num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads, num_key_value_heads=preset.num_key_value_heads,
        kv_lora_rank=preset.kv_lora_rank, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=preset.num_hidden_layers,  # every layer dense: no MoE kernels needed
        max_position_embeddings=preset.max_position_embeddings, rope_theta=preset.rope_theta,
        bos_token_id=special_ids[BOS_TOKEN], eos_token_id=special_ids[EOS_TOKEN],
        pad_token_id=special_ids[PAD_TOKEN], tie_word_embeddings=False,
    )
    config.architectures = ["DeepseekV2ForCausalLM"]
    generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                  pad_token_id=config.pad_token_id)
    if not preset.weights:
        config.save_pretrained(out_dir)
        generation.save_pretrained(out_dir)
        return
    # Random weights with the usual init: vLLM's dummy loader draws tiny uniform ones, under which
    # attention is nearly uniform and the output barely depends on the KV (a negative control
    # that overwrites the KV could not bite).
    import torch
    from transformers import DeepseekV2ForCausalLM

    previous_rng = torch.random.get_rng_state()
    torch.manual_seed(preset.seed)
    try:
        model = DeepseekV2ForCausalLM(config).to(torch.bfloat16).eval()
    finally:
        torch.random.set_rng_state(previous_rng)
    model.generation_config = generation
    model.save_pretrained(out_dir)


def _build_granite_hybrid(preset: ModelPreset, out_dir: Path, special_ids: dict[str, int]) -> None:
    """Random weights of a small GraniteMoeHybrid (Mamba-2 + attention layers, dense MLPs)."""
    import torch
    from transformers import GenerationConfig, GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    mamba_d_head = 32 if preset.hidden_size < 512 else 64
    config = GraniteMoeHybridConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads, max_position_embeddings=preset.max_position_embeddings,
        layer_types=list(preset.layer_types or ()), num_local_experts=0, num_experts_per_tok=0,
        shared_intermediate_size=preset.intermediate_size, mamba_n_heads=2 * preset.hidden_size // mamba_d_head,
        mamba_d_head=mamba_d_head, mamba_n_groups=1,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, position_embedding_type="rope",
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        bos_token_id=special_ids[BOS_TOKEN], eos_token_id=special_ids[EOS_TOKEN],
        pad_token_id=special_ids[PAD_TOKEN], tie_word_embeddings=False,
    )
    config.architectures = ["GraniteMoeHybridForCausalLM"]
    previous_rng = torch.random.get_rng_state()
    torch.manual_seed(preset.seed)
    try:
        model = GraniteMoeHybridForCausalLM(config).to(getattr(torch, preset.hybrid_dtype)).eval()
    finally:
        torch.random.set_rng_state(previous_rng)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out_dir)


def _build_weights(preset: ModelPreset, out_dir: Path, special_ids: dict[str, int]) -> None:
    if preset.architecture == "deepseek_v2":
        _build_mla_config(preset, out_dir, special_ids)
        return
    if preset.architecture == "granitemoehybrid":
        _build_granite_hybrid(preset, out_dir, special_ids)
        return
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        head_dim=preset.head_dim,
        max_position_embeddings=preset.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        bos_token_id=special_ids[BOS_TOKEN],
        eos_token_id=special_ids[EOS_TOKEN],
        pad_token_id=special_ids[PAD_TOKEN],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    if preset.layer_types is not None:
        config.layer_types = list(preset.layer_types)
        config.sliding_window = preset.sliding_window
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    if not preset.weights:
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(out_dir)
        generation.save_pretrained(out_dir)
        return
    previous_rng = torch.random.get_rng_state()
    torch.manual_seed(preset.seed)
    try:
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    finally:
        torch.random.set_rng_state(previous_rng)
    model.generation_config = generation
    model.save_pretrained(out_dir)


def _build_into(name: str, preset: ModelPreset, out_dir: Path) -> None:
    _train_tokenizer(preset, out_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    special_ids = {t: tok.convert_tokens_to_ids(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)}
    _build_weights(preset, out_dir, special_ids)
    info = {"preset": name, "build_version": BUILD_VERSION, **dataclasses.asdict(preset)}
    (out_dir / "kvbm_preset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _publish(final: Path, build: Callable[[Path], None]) -> bool:
    """Build into a private directory next to ``final`` and rename it into place.

    Idempotent and safe when several processes build at once: a loser of the race
    discards its copy and uses the winner's. Returns whether this call's copy won.
    ``build`` writes the files; the completion marker is written here, last.
    """
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        build(tmp)
        for path in tmp.iterdir():
            path.chmod(0o644)  # some writers create private files; the cache is shared
        (tmp / _COMPLETE_MARKER).write_text("")
        if final.exists() and not _is_complete(final):
            # Left by something other than this function (we only rename complete
            # builds); move it aside rather than deleting under another reader.
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=root))
            try:
                os.replace(final, stale / "old")
            except OSError:
                pass
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
            logger.info("another process finished %s first; using its copy", final)
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in root.glob(f".{final.name}.stale-*"):
            shutil.rmtree(stale, ignore_errors=True)


def build_model(cache_dir: str | Path | None = None, *, preset: str = "test") -> Path:
    """Return the directory of the ``preset`` model, building it on first use (see ``_publish``)."""
    spec = _get_preset(preset)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / model_dir_name(preset)
    if _is_complete(final):
        return final
    start = time.monotonic()
    logger.info("building %s model into %s", preset, final)
    if _publish(final, lambda out: _build_into(preset, spec, out)):
        logger.info("built %s model in %.1f s", preset, time.monotonic() - start)
    return final


def build_eagle_draft(target: str | Path) -> Path:
    """Return an EAGLE-1 draft head for the Llama model at ``target``, building it on first use.

    Speculative decoding with a draft head is what GPU users run (EAGLE, MTP), and its layer
    has a KV cache of its own in the target's KV-cache group: kvbm stores and loads that
    layer's pages with the target's. The head is one random Llama decoder layer without an
    input norm plus ``fc`` (embedding ++ hidden -> hidden), named as EAGLE checkpoints are; it
    shares the target's embedding and LM head. Its proposals are mostly rejected, which is
    fine: greedy speculative decoding must give the target's tokens whatever the draft says.
    """
    target = Path(target)
    final = target.with_name(target.name + "-eagle")
    if not _is_complete(final):
        _publish(final, lambda out: _build_eagle_into(target, out))
    return final


def _build_eagle_into(target: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(target)
    config.num_hidden_layers = 1
    for stale in ("layer_types", "sliding_window"):
        if hasattr(config, stale):
            delattr(config, stale)
    config.architectures = ["LlamaForCausalLM"]
    previous_rng = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        layer = LlamaForCausalLM(config).to(torch.bfloat16).model.layers[0]
        fc = torch.randn(config.hidden_size, 2 * config.hidden_size) / (2 * config.hidden_size) ** 0.5
    finally:
        torch.random.set_rng_state(previous_rng)
    weights = {f"layers.0.{name}": tensor.contiguous() for name, tensor in layer.state_dict().items()
               if not name.startswith("input_layernorm")}  # EAGLE's first layer has no input norm
    weights["fc.weight"] = fc.to(torch.bfloat16)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (target / name).exists():
            shutil.copy(target / name, out / name)


def main(argv: Sequence[str] | None = None) -> int:
    """Build (if needed) and print the model path: ``python -m kvbm.tools.demo.tiny_model``."""
    parser = argparse.ArgumentParser(
        prog="python -m kvbm.tools.demo.tiny_model",
        description="Build a random-weight Llama model with a local tokenizer and print its path.",
    )
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(build_model(args.cache_dir, preset=args.preset))
    return 0


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset`` and ``--cache-dir`` (shared with ``kvbm build-model``)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="test", help="model size (default: %(default)s)")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"where models are kept (default: ${CACHE_ENV} or {DEFAULT_CACHE_DIR})",
    )


if __name__ == "__main__":
    raise SystemExit(main())
