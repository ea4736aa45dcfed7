"""Tiny real models and data that tests and benchmarks build themselves (no hub, no downloads).

`write_models_dir(root)` lays models out under their hub ids (root/distilbert/distilgpt2,
root/EleutherAI/gpt-j-6B, ...), so the CLI finds them through `models_dir=root`
with the shipped configs unchanged. All share one byte-level BPE tokenizer trained
here; the GPT-J copy keeps GPT-J's quirk of a head larger than the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from specbench.engine.schedule import StepState

EOS = "<|endoftext|>"
# GPT-J-6B: 50400 logits for the 50257 tokens of the GPT-2 tokenizer.
GPTJ_SPARE_ROWS = 50400 - 50257

WORDS = (
    "patients treatment study results mortality risk cohort trial outcome clinical hospital therapy dose "
    "significant analysis group years increased reduced association disease surgery children women men "
    "cancer blood heart lung kidney liver brain infection vaccine protein gene cell tissue sample control "
    "randomized prospective retrospective survival follow-up incidence prevalence diagnosis symptoms pain "
    "whether does is are was were the a of in to and with for on by at from that this these those not no yes"
).split()

QUESTIONS = [
    "Does early surgery reduce mortality in elderly patients with hip fracture?",
    "Is vitamin D deficiency associated with increased risk of infection in children?",
    "Do statins improve survival after heart surgery?",
    "Is the new vaccine effective in women over sixty years?",
    "Does physical therapy reduce pain after knee replacement?",
    "Are kidney outcomes worse in patients with diabetes and high blood pressure?",
    "Is smoking associated with lung cancer incidence in a prospective cohort?",
    "Does a low dose of aspirin prevent stroke in men?",
]


def corpus() -> list[str]:
    """A few hundred deterministic pseudo-abstract sentences to train the tokenizer on."""
    generator = torch.Generator().manual_seed(0)
    sentences = list(QUESTIONS)
    for _ in range(400):
        picks = torch.randint(len(WORDS), (12,), generator=generator).tolist()
        sentences.append(" ".join(WORDS[i] for i in picks) + ".")
    return sentences


def train_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer, GPT-2 style, with <|endoftext|> as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def make_model(arch: str, vocab_size: int, seed: int, layers: int = 2, context: int = 512) -> PreTrainedModel:
    """A randomly initialised tiny model of a real architecture (gpt2, gpt_neo, gptj, llama, qwen2).

    "qwen2" is plain Qwen2 (Qwen2.5's architecture): full attention in every layer, and biases on the query,
    key and value projections, drawn at random here (transformers starts them at zero, where they do nothing),
    about as large as the projections' outputs. Its weights start 10x wider than transformers' default, so that
    attention depends on positions: at the default, a tiny rotary model attends almost uniformly, and wrong
    positions leave its greedy output unchanged.
    """
    torch.manual_seed(seed)
    common = {"bos_token_id": 0, "eos_token_id": 0}
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=32, n_layer=layers, n_head=2, **common)
        return GPT2LMHeadModel(config).eval()
    if arch == "gpt_neo":
        # alternate global and local (windowed) attention layers, as GPT-Neo does
        attention_types = [[["global", "local"], layers // 2]] + ([[["global"], 1]] if layers % 2 else [])
        config = GPTNeoConfig(
            vocab_size=vocab_size,
            max_position_embeddings=context,
            hidden_size=32,
            num_layers=layers,
            num_heads=2,
            attention_types=attention_types,
            window_size=16,
            **common,
        )
        return GPTNeoForCausalLM(config).eval()
    if arch == "gptj":
        config = GPTJConfig(
            vocab_size=vocab_size + GPTJ_SPARE_ROWS,
            n_positions=context,
            n_embd=32,
            n_layer=layers,
            n_head=2,
            rotary_dim=8,
            **common,
        )
        return GPTJForCausalLM(config).eval()
    # Llama and Qwen2 share a shape: grouped-query attention, 4 query heads over 2 key/value heads
    grouped = {"vocab_size": vocab_size, "max_position_embeddings": context, "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
               "num_key_value_heads": 2, **common}  # fmt: skip
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**grouped)).eval()
    if arch == "qwen2":
        config = Qwen2Config(initializer_range=0.2, **grouped)
        model = Qwen2ForCausalLM(config).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    projection.bias.normal_()
        return model
    raise ValueError(arch)


class StepClock:
    """A scheduler clock that advances one unit at every reading, and jumps ahead when the scheduler waits:
    which requests join which step of `engine.continuous.serve` is then fixed by their arrival times."""

    def __init__(self) -> None:
        self.time = 0.0

    def now(self, wait: bool = True) -> float:
        self.time += 1.0
        return self.time

    def wait_until(self, seconds: float) -> None:
        self.time = max(self.time, seconds)


class ScriptedPolicy:
    """A step policy (`engine.schedule.StepPolicy`) that gives k per step from a script, cycling (0: a plain
    step), and keeps what it was shown and told: the states it chose for, the steps and the drafters' reads."""

    def __init__(self, ks: list[int]) -> None:
        self.ks, self.states, self.observed, self.reads = ks, [], [], []

    def k_for_step(self, state: StepState) -> int:
        self.states.append(state)
        return self.ks[(len(self.states) - 1) % len(self.ks)]

    def observe_step(self, k: int, occupancy: int, seconds: float) -> None:
        self.observed.append((k, occupancy, seconds))

    def observe_read(self, tokens: int, seconds: float) -> None:
        self.reads.append((tokens, seconds))


def untie_head(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Give the model its own random output head: tiny tied GPT-2s mostly repeat their last token."""
    generator = torch.Generator().manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator))
    return model


def one_torch_thread() -> Iterator[None]:
    """Run tiny models on one thread: faster, and unharmed when other processes load the cores.

    A test module uses it as `pytest.fixture(autouse=True, scope="module")(one_torch_thread)`;
    the previous thread count comes back afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_windowed_model(arch: str, vocab_size: int, seed: int, window: int, layers: int = 2) -> PreTrainedModel:
    """A tiny model with sliding-window attention: "mistral" (every layer) or "qwen2" (every layer but the first)."""
    torch.manual_seed(seed)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": window,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**common)).eval()
    if arch == "qwen2":
        config = Qwen2Config(use_sliding_window=True, max_window_layers=1, **common)
        assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
        return Qwen2ForCausalLM(config).eval()
    raise ValueError(arch)


# hub id -> (architecture, seed, layers): the ids the shipped configs name
HUB_MODELS = {
    "EleutherAI/gpt-j-6B": ("gptj", 10, 3),
    "openai-community/gpt2-large": ("gpt2", 11, 3),
    "openai-community/gpt2-xl": ("gpt2", 12, 3),
    "distilbert/distilgpt2": ("gpt2", 20, 1),
    "openai-community/gpt2": ("gpt2", 21, 2),
    "EleutherAI/gpt-neo-125M": ("gpt_neo", 22, 2),
    "openai-community/gpt2-medium": ("gpt2", 23, 2),
}


def write_models_dir(root: Path) -> Path:
    """Save every model of HUB_MODELS (with the shared tokenizer) under root/<hub id>; return root."""
    tokenizer = train_tokenizer()
    for hub_id, (arch, seed, layers) in HUB_MODELS.items():
        folder = root / hub_id
        make_model(arch, len(tokenizer), seed, layers).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return root


def write_pubmedqa_jsonl(path: Path, count: int = 8) -> Path:
    """A small file in the HF pqa_labeled schema (made-up text, not PubMedQA)."""
    generator = torch.Generator().manual_seed(1)
    with path.open("w", encoding="utf-8") as out:
        for index in range(count):
            sections = []
            for _ in range(2):
                picks = torch.randint(len(WORDS), (30,), generator=generator).tolist()
                sections.append(" ".join(WORDS[i] for i in picks) + ".")
            record = {
                "pubid": str(1000 + index),
                "question": QUESTIONS[index % len(QUESTIONS)],
                "context": {"contexts": sections, "labels": ["BACKGROUND", "RESULTS"], "meshes": []},
                "long_answer": "made up",
                "final_decision": "yes",
            }
            out.write(json.dumps(record) + "\n")
    return path


def write_gguf_llama(
    path: Path,
    seed: int = 0,
    noise: float = 0.0,
    layers: int = 2,
    context: int = 512,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """A tiny random llama (`make_model`'s, float32) and a tokenizer (default: the shared one) as a GGUF file
    llama.cpp and transformers both load; `noise` perturbs every weight (a draft that agrees with the seed's model
    on some tokens, not all). Written the way llama.cpp's converter writes llama: q and k rows permuted for its
    rotary layout, which transformers' GGUF loader undoes; tokens added to the tokenizer become user-defined."""
    tokenizer = tokenizer or train_tokenizer()
    model = untie_head(make_model("llama", len(tokenizer), seed, layers, context), seed + 1)
    if noise:
        generator = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for weight in model.parameters():
                weight.add_(noise * torch.randn(weight.shape, generator=generator))
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    import gguf  # the GGUF writer: only the llama.cpp tests need it

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokenizer))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = [
        gguf.TokenType.CONTROL if token == EOS else gguf.TokenType.NORMAL if token in bpe["vocab"]
        else gguf.TokenType.USER_DEFINED
        for token in tokens
    ]  # fmt: skip
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(merge) for merge in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)

    def rotary_rows(weight: torch.Tensor, count: int) -> torch.Tensor:
        return weight.reshape(count, 2, weight.shape[0] // count // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    layer_names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for name, weight in model.state_dict().items():
        parts = name.removeprefix("model.").removesuffix(".weight")
        if parts.startswith("layers."):
            _, index, module = parts.split(".", 2)
            gguf_name = f"blk.{index}.{layer_names[module]}"
            if module == "self_attn.q_proj":
                weight = rotary_rows(weight, heads)
            elif module == "self_attn.k_proj":
                weight = rotary_rows(weight, kv_heads)
        else:
            gguf_name = names[parts]
        writer.add_tensor(f"{gguf_name}.weight", weight.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
