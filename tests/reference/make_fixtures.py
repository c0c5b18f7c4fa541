#!/usr/bin/env python3
"""Generate the reference fixtures for softprompt's parity tests.

Everything is built from scratch here (no model hub): a tiny random BERT and a
tiny random RoBERTa with their own trained tokenizers, HF PEFT soft-prompt
adapters on top of them (PROMPT_TUNING, P_TUNING, PREFIX_TUNING), and the
logits/prompts/features HF computes for a fixed padded batch.

Outputs (all under tests/fixtures/):
  tiny-bert/          BertForSequenceClassification (keys `bert.*` + `classifier.*`) + tokenizer
  tiny-bert-st/       the same encoder saved as a plain BertModel (keys without `bert.`)
  tiny-roberta/       RobertaForSequenceClassification + byte-level BPE tokenizer
  adapters/<name>/    PEFT save_pretrained output (adapter_config.json, adapter_model.safetensors)
  expected.json       inputs, token ids, logits, effective prompts, base-model features

Deterministic: fixed seeds, single-threaded torch; re-running rewrites identical files.
Run from anywhere:  .venv/bin/python tests/reference/make_fixtures.py
"""
import json
import os
import shutil
import sys
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tokenizers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import AddedToken  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaTokenizerFast,
)
import peft  # noqa: E402
from peft import (  # noqa: E402
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)

REPO = Path(__file__).resolve().parents[2]
os.chdir(REPO)  # all paths below (and the ones PEFT writes into adapter_config.json) are repo-relative
FIX = Path("tests/fixtures")
BERT_DIR = FIX / "tiny-bert"
BERT_ST_DIR = FIX / "tiny-bert-st"
ROBERTA_DIR = FIX / "tiny-roberta"
ADAPTERS = FIX / "adapters"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()

# --------------------------------------------------------------------------------------
# Corpus for the tokenizers (plain English, written here so nothing is downloaded)
# --------------------------------------------------------------------------------------
CORPUS = [
    "The movie was great and the actors were wonderful.",
    "I did not like the food at all, it was cold and bland.",
    "The cat sat on the mat while the dog slept by the door.",
    "Is the service good? Yes, the service is very good.",
    "She reads a book every night before she goes to sleep.",
    "The weather today is sunny with a light breeze from the west.",
    "We walked to the park and played football with our friends.",
    "This restaurant serves the best pizza in the whole city.",
    "The train was late again, so I missed my meeting.",
    "He bought a new phone because the old one stopped working.",
    "Classify the sentiment of this review as positive or negative.",
    "The product arrived broken and the support team never answered.",
    "What a fantastic day, everything went exactly as planned!",
    "The children laughed and sang songs in the garden.",
    "Please turn off the lights when you leave the room.",
    "The report was boring, long and full of mistakes.",
    "I love this song, it makes me happy every time.",
    "The hotel room was small but clean and quiet.",
    "They are planning a trip to the mountains next summer.",
    "The teacher explained the lesson slowly and clearly.",
    "My computer is slow and crashes several times a day.",
    "The soup tasted amazing, I would order it again.",
    "Traffic in the morning is terrible in this part of town.",
    "The museum opens at nine and closes at five.",
    "Our team won the match after a very hard game.",
    "The instructions were confusing and the app kept failing.",
    "A small bird was singing on the roof of the house.",
    "The price is too high for such a cheap product.",
    "I think the new policy is fair and reasonable.",
    "The flight was delayed for three hours without any explanation.",
    "He smiled, waved, and walked away into the rain.",
    "The garden is full of red and yellow flowers in spring.",
    "Customer support solved my problem in five minutes.",
    "The film was too long, but the ending was beautiful.",
    "Do you know where the nearest station is?",
    "The coffee here is strong, hot and fresh.",
    "Unfortunately the umbrella was useless under that heavy rain.",
]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4

# The batch every adapter is run on: 2 pairs, different lengths, an unknown
# symbol (-> [UNK] for WordPiece, raw bytes for byte-level BPE) and a rare word
# that WordPiece splits into ## pieces.
INPUTS = [
    ("the movie was great", None),
    ("I did not like the food at all, it was cold and bland.", None),
    ("The cat sat on the mat.", "A dog slept by the door."),
    ("Is the service good?", "yes"),
    ("the \u2603 snowman was unbelievably happy", None),
    ("good", None),
]

COMMON_SIZES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    initializer_range=0.2,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def f32list(t: torch.Tensor):
    """Nested lists of python floats; json writes repr(float(x)), which round-trips the f32 exactly."""
    return t.detach().to(torch.float32).cpu().tolist()


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------
def train_wordpiece_vocab(normalizer, pre_tokenizer, corpus, vocab_size: int, specials) -> dict:
    """WordPiece vocabulary learned with the same merge loop as tokenizers' WordPieceTrainer.

    tokenizers' own WordPieceTrainer is not reproducible: it numbers the `##x` continuation
    characters in hash-map order, which changes merge tie-breaking and so the learned vocabulary
    from run to run. This is the same algorithm (BPE merges over words split into
    `c ##c ##c ...`, most frequent pair first) with ties broken lexicographically.
    """
    counts = {}
    for line in corpus:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in counts}
    vocab = list(specials)
    vocab += sorted({p for pieces in words.values() for p in pieces if not p.startswith("##")})
    vocab += sorted({p for pieces in words.values() for p in pieces if p.startswith("##")})
    seen = set(vocab)
    while len(vocab) < vocab_size:
        pairs = {}
        for w, pieces in words.items():
            for a, b in zip(pieces, pieces[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda ab: (-pairs[ab], ab))
        merged = best[0] + best[1][2:]
        for w, pieces in words.items():
            out, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            words[w] = out
        if merged not in seen:
            seen.add(merged)
            vocab.append(merged)
    return {tok: i for i, tok in enumerate(vocab)}


def build_bert_tokenizer() -> BertTokenizerFast:
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = train_wordpiece_vocab(normalizer, pre_tokenizer, CORPUS, 300, BERT_SPECIALS)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    for i, s in enumerate(BERT_SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.no_padding()
    tok.no_truncation()
    return BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def build_roberta_tokenizer() -> RobertaTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=ROBERTA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    for i, s in enumerate(ROBERTA_SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.post_processor = processors.RobertaProcessing(sep=("</s>", 2), cls=("<s>", 0), trim_offsets=True, add_prefix_space=False)
    tok.no_padding()
    tok.no_truncation()
    return RobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
        add_prefix_space=False,
        trim_offsets=True,
        model_max_length=62,
    )


# --------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------
@torch.no_grad()
def perturb_norms_and_biases(model: torch.nn.Module) -> None:
    """HF init leaves LayerNorm at (1, 0) and all biases at 0; make every tensor matter."""
    for name, p in model.named_parameters():
        if "LayerNorm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))


def build_bert(tokenizer) -> BertForSequenceClassification:
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        type_vocab_size=2,
        pad_token_id=0,
        num_labels=2,
        **COMMON_SIZES,
    )
    seed_all(1)
    model = BertForSequenceClassification(cfg)
    perturb_norms_and_biases(model)
    return model.eval()


def build_roberta(tokenizer) -> RobertaForSequenceClassification:
    cfg = RobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=66,  # 64 usable positions + padding_idx (1) + 1
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=2,
        **COMMON_SIZES,
    )
    seed_all(2)
    model = RobertaForSequenceClassification(cfg)
    perturb_norms_and_biases(model)
    return model.eval()


def reset_dir(d: Path) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)


def save_base(model, tokenizer, d: Path) -> None:
    reset_dir(d)
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    tj = json.loads((d / "tokenizer.json").read_text())
    assert tj["padding"] is None and tj["truncation"] is None, "tokenizer.json must not pad/truncate"


def save_bert_st(model, tokenizer, d: Path) -> None:
    """sentence-transformers layout: plain BertModel weights, no `bert.` prefix."""
    reset_dir(d)
    model.bert.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    keys = load_file(str(d / "model.safetensors")).keys()
    assert all(k.split(".")[0] in ("embeddings", "encoder", "pooler") for k in keys), sorted(keys)


# --------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------
ADAPTER_SPECS = [
    # name, model, labels, peft config factory, randomize prompt embedding?
    ("pt_random_2", "tiny-bert", 2,
     lambda: PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=5,
                                prompt_tuning_init=PromptTuningInit.RANDOM), True),
    ("pt_text_3", "tiny-bert", 3,
     lambda: PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4,
                                prompt_tuning_init=PromptTuningInit.TEXT,
                                prompt_tuning_init_text="classify the sentiment",
                                tokenizer_name_or_path=str(BERT_DIR)), False),
    ("ptune_mlp_2", "tiny-bert", 2,
     lambda: PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=6,
                                 encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP,
                                 encoder_hidden_size=16), True),
    ("ptune_lstm_3", "tiny-bert", 3,
     lambda: PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=3,
                                 encoder_reparameterization_type=PromptEncoderReparameterizationType.LSTM,
                                 encoder_hidden_size=16), True),
    ("prefix_2", "tiny-bert", 2,
     lambda: PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=7), True),
    ("prefix_proj_3", "tiny-bert", 3,
     lambda: PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4, prefix_projection=True,
                                encoder_hidden_size=16), True),
    ("roberta_pt_2", "tiny-roberta", 2,
     lambda: PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=5,
                                prompt_tuning_init=PromptTuningInit.RANDOM), True),
    ("roberta_prefix_3", "tiny-roberta", 3,
     lambda: PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4), True),
]

MODEL_DIRS = {"tiny-bert": BERT_DIR, "tiny-roberta": ROBERTA_DIR}
MODEL_CLASSES = {"tiny-bert": BertForSequenceClassification, "tiny-roberta": RobertaForSequenceClassification}


def load_base(model_name: str, num_labels: int, seed: int):
    seed_all(seed)
    return MODEL_CLASSES[model_name].from_pretrained(
        str(MODEL_DIRS[model_name]), num_labels=num_labels, ignore_mismatched_sizes=True, attn_implementation="eager"
    ).eval()


@torch.no_grad()
def randomize_trainables(pm, randomize_prompt: bool, prompt_std: float = 1.0) -> list:
    """Move every trainable tensor away from its init. Returns what was touched (for the log)."""
    touched = []
    for name, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("prompt_encoder.") and name.endswith("embedding.weight"):
            if not randomize_prompt:
                continue
            p.copy_(prompt_std * torch.randn_like(p))  # N(0, 1) unless told otherwise
        elif name.startswith("prompt_encoder."):
            p.copy_(0.3 * torch.randn_like(p))  # MLP / LSTM / prefix projection
        elif "modules_to_save" in name:
            p.copy_(0.5 * torch.randn_like(p))  # classifier head, N(0, 0.5)
        else:
            raise AssertionError(f"unexpected trainable parameter {name}")
        touched.append(name)
    return touched


def encode(tokenizer, inputs):
    """Unpadded per-row encodings + one right-padded batch (padding=True -> longest row)."""
    assert tokenizer.padding_side == "right"
    rows = [tokenizer(a, b, return_token_type_ids=True) for a, b in inputs]
    batch = tokenizer.pad(
        [{k: r[k] for k in ("input_ids", "token_type_ids", "attention_mask")} for r in rows],
        padding=True,
        return_tensors="pt",
    )
    return rows, batch


ROBERTA_PREFIX_NOTE = (
    "peft 0.21.2 + transformers 4.57.6 crash on PREFIX_TUNING with RobertaForSequenceClassification: "
    "PeftModelForSequenceClassification._prefix_tuning_forward calls model.roberta directly and takes "
    "outputs[1] as the pooled output, but RobertaModel has no pooler and returns the DynamicCache there. "
    "These logits replicate PEFT's intended path by hand (same prefix/cache/mask as PEFT builds, "
    "classifier head on last_hidden_state, i.e. the head reads the <s> text token); the identical "
    "by-hand path is checked against PEFT's own forward on the BERT prefix adapters."
)


@torch.no_grad()
def prefix_forward_by_hand(pm, batch):
    """What PeftModelForSequenceClassification._prefix_tuning_forward does, written out."""
    cfg = pm.active_peft_config
    bsz = batch["input_ids"].shape[0]
    mask = torch.cat([torch.ones(bsz, cfg.num_virtual_tokens, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1)
    base = pm.get_base_model()
    is_roberta = base.config.model_type == "roberta"
    backbone = base.roberta if is_roberta else base.bert
    out = backbone(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        token_type_ids=batch["token_type_ids"],
        past_key_values=pm.get_prompt(bsz),
    )
    features = out.last_hidden_state if is_roberta else out.pooler_output
    return base.classifier(features)


@torch.no_grad()
def run_peft(pm, batch):
    """Logits of the padded batch in one PeftModel call. Returns (logits, note or None)."""
    is_prefix = pm.active_peft_config.peft_type == peft.PeftType.PREFIX_TUNING
    if is_prefix and pm.get_base_model().config.model_type == "roberta":
        return prefix_forward_by_hand(pm, batch), ROBERTA_PREFIX_NOTE
    logits = pm(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
    ).logits
    if is_prefix:
        by_hand = prefix_forward_by_hand(pm, batch)
        assert torch.allclose(logits, by_hand, atol=1e-6, rtol=0), (logits - by_hand).abs().max()
    return logits, None


def inputs_json(inputs):
    return [{"text": a, "text_pair": b} for a, b in inputs]


def cache_layer_kv(cache, layer: int):
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]


@torch.no_grad()
def check_prefix_layout(pm, saved: torch.Tensor, cfg) -> None:
    """saved[t, ((2*l + kv)*heads + h)*head_dim + d] == past_key_values[l][kv][0, h, t, d]."""
    cache = pm.get_prompt(batch_size=1)
    L, H = cfg.num_layers, cfg.num_attention_heads
    D = cfg.token_dim // H
    n = cfg.num_virtual_tokens
    assert saved.shape == (n, L * 2 * H * D), saved.shape
    for layer in range(L):
        k, v = cache_layer_kv(cache, layer)
        for kv, t_kv in enumerate((k, v)):
            assert t_kv.shape == (1, H, n, D), t_kv.shape
            for h in range(H):
                for t in range(n):
                    start = ((2 * layer + kv) * H + h) * D
                    assert torch.equal(saved[t, start:start + D], t_kv[0, h, t]), (layer, kv, h, t)


@torch.no_grad()
def make_adapter(name, model_name, num_labels, make_cfg, randomize_prompt, tokenizer, seed,
                 inputs=INPUTS, out_root=ADAPTERS, prompt_std=1.0):
    base = load_base(model_name, num_labels, seed)
    seed_all(seed + 1000)
    pm = get_peft_model(base, make_cfg())
    touched = randomize_trainables(pm, randomize_prompt, prompt_std)
    pm.eval()
    cfg = pm.active_peft_config

    out_dir = out_root / name
    reset_dir(out_dir)
    pm.save_pretrained(str(out_dir), safe_serialization=True)
    card = out_dir / "README.md"  # PEFT's model card: not needed by the loader
    if card.exists():
        card.unlink()
    saved = load_file(str(out_dir / "adapter_model.safetensors"))

    rows, batch = encode(tokenizer, inputs)
    logits, note = run_peft(pm, batch)

    case = {
        "adapter": name,
        "model": model_name,
        "peft_type": cfg.peft_type.value if hasattr(cfg.peft_type, "value") else str(cfg.peft_type),
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_labels": num_labels,
        "inputs": inputs_json(inputs),
        "input_ids": [r["input_ids"] for r in rows],
        "token_type_ids": [r["token_type_ids"] for r in rows],
        "logits": f32list(logits),
    }
    if note:
        case["reference_note"] = note
    pt = case["peft_type"]
    if pt in ("PROMPT_TUNING", "P_TUNING"):
        prompt = pm.get_prompt(batch_size=1)[0]
        # PEFT saves the *effective* prompt (encoder output for P_TUNING), so the file equals what forward uses
        assert torch.equal(saved["prompt_embeddings"], prompt), name
        case["prompt"] = f32list(prompt)
        if name == "pt_text_3":
            init_ids = tokenizer("classify the sentiment")["input_ids"][: cfg.num_virtual_tokens]
            wte = pm.get_base_model().get_input_embeddings().weight
            assert torch.equal(prompt, wte[torch.tensor(init_ids)]), "TEXT init mismatch"
            case["prompt_init_token_ids"] = init_ids
    else:
        check_prefix_layout(pm, saved["prompt_embeddings"], cfg)
        k0, _ = cache_layer_kv(pm.get_prompt(batch_size=1), 0)
        case["prefix_layer0_key_head0"] = f32list(k0[0, 0])

    # round trip: load the saved adapter onto a fresh base exactly as a user would
    fresh = load_base(model_name, num_labels, seed + 500)
    re = PeftModel.from_pretrained(fresh, str(out_dir)).eval()
    logits2, _ = run_peft(re, batch)
    assert torch.allclose(logits, logits2, atol=1e-6, rtol=0), (name, (logits - logits2).abs().max())

    info = {
        "saved_keys": {k: list(v.shape) for k, v in sorted(saved.items())},
        "randomized": touched,
    }
    return case, info


@torch.no_grad()
def base_features(model_name, tokenizer, inputs=INPUTS):
    model = load_base(model_name, 2, 7)
    encoder = getattr(model, model.base_model_prefix)
    rows, batch = encode(tokenizer, inputs)
    out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    hs = out.last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hs.dtype)
    mean = (hs * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return {
        "model": model_name,
        "inputs": inputs_json(inputs),
        "input_ids": [r["input_ids"] for r in rows],
        "token_type_ids": [r["token_type_ids"] for r in rows],
        "pooler_output": f32list(out.pooler_output) if out.pooler_output is not None else None,
        "cls_hidden": f32list(hs[:, 0]),
        "mean_pooled": f32list(mean),
    }


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main() -> None:
    FIX.mkdir(parents=True, exist_ok=True)

    bert_tok = build_bert_tokenizer()
    bert = build_bert(bert_tok)
    save_base(bert, bert_tok, BERT_DIR)
    save_bert_st(bert, bert_tok, BERT_ST_DIR)

    rob_tok = build_roberta_tokenizer()
    rob = build_roberta(rob_tok)
    save_base(rob, rob_tok, ROBERTA_DIR)

    # reload the tokenizers from disk so the ids recorded are what the saved tokenizer.json produces
    bert_tok = BertTokenizerFast.from_pretrained(str(BERT_DIR))
    rob_tok = RobertaTokenizerFast.from_pretrained(str(ROBERTA_DIR))
    toks = {"tiny-bert": bert_tok, "tiny-roberta": rob_tok}

    if ADAPTERS.exists():
        shutil.rmtree(ADAPTERS)
    cases, report = [], {}
    for i, (name, model_name, labels, make_cfg, rand_prompt) in enumerate(ADAPTER_SPECS):
        case, info = make_adapter(name, model_name, labels, make_cfg, rand_prompt, toks[model_name], seed=100 + 10 * i)
        cases.append(case)
        report[name] = info

    # position budget: virtual tokens + longest input must fit the position table
    for c in cases:
        longest = max(len(x) for x in c["input_ids"])
        assert c["num_virtual_tokens"] + longest <= 64, (c["adapter"], longest)

    expected = {
        "generator": "tests/reference/make_fixtures.py",
        "versions": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "cases": cases,
        "base": [base_features("tiny-bert", bert_tok), base_features("tiny-roberta", rob_tok)],
    }
    (FIX / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")

    for name, info in report.items():
        print(f"{name}: saved {info['saved_keys']}")
    for d in (BERT_DIR, BERT_ST_DIR, ROBERTA_DIR, ADAPTERS):
        print(f"{d}: {dir_size(d)} bytes")
    print(f"{FIX / 'expected.json'}: {(FIX / 'expected.json').stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
