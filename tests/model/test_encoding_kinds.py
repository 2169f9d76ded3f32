"""Encodings keep every field and every token, for every tokenizer kind: WordPiece, byte-level BPE (Qwen2, GPT-2, and
RoBERTa, whose offsets are trimmed), SentencePiece/Unigram. The references are the tokenizer's own decode and its own
tokenization of the filled-in text, and HF's own forward for the causal verbalizer.
"""
import json
import re

import pytest
import torch

from conftest import toy_rows
from ptp_core.tasks.benchmarks import BENCHMARKS
from ptp_core.tasks.task import check_causal_template, check_template
from ptp_core.model.encoding import encode, label_word_ids
from ptp_core.model.templates import IGNORE, candidate_row, example_rows, pair_row, template_row

SENTENCES = ["the sun was rising", "the grass was wet", "it was rain", "the man broke his toe", "the movie was good",
             "it was great", "it was terrible", "a person makes music", "Premise: the sun", "Question: the grass?",
             "Answer: yes", "great : the movie", "the movie It was great."]
KINDS = ("wordpiece", "qwen2", "gpt2", "roberta", "unigram")
MASKED_KINDS = ("wordpiece", "roberta")  # the kinds here with a mask token, as a masked LM's tokenizer has
TEMPLATE = "Premise: {premise} Question: {hypothesis}? Answer:"


def _byte_level(corpus):
    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(corpus, vocab_size=400, min_frequency=1, show_progress=False,
                                special_tokens=["<|endoftext|>", "<s>", "</s>", "<pad>", "<unk>", "<mask>"])
    model = json.loads(trainer._tokenizer.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]


@pytest.fixture(scope="module")
def tokenizers_by_kind() -> dict:
    """One tiny tokenizer of each kind, trained offline on the same sentences (whole words become tokens)."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import BertTokenizerFast, GPT2Tokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer, RobertaTokenizer

    corpus = SENTENCES * 20
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(corpus, vocab_size=200, min_frequency=1, show_progress=False)
    vocab, merges = _byte_level(corpus)
    # SentencePiece/Unigram as T5's: "▁word" pieces, single characters as a fallback, every segment ends with </s>
    words = sorted({word for sentence in SENTENCES for word in re.findall(r"\w+", sentence)})
    characters = sorted(set("".join(SENTENCES)) - {" "})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)] + [("▁" + w, -1.0) for w in words] + [
        (c, -10.0) for c in characters]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return {"wordpiece": BertTokenizerFast(vocab=wordpiece.get_vocab()),
            "qwen2": Qwen2Tokenizer(vocab=vocab, merges=merges),
            "gpt2": GPT2Tokenizer(vocab=vocab, merges=merges),
            "roberta": RobertaTokenizer(vocab=vocab, merges=merges),
            "unigram": PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>",
                                               eos_token="</s>", unk_token="<unk>")}


def _letters(text: str) -> str:
    return "".join(text.split())


def _decoded(tokenizer, ids) -> str:
    return _letters(tokenizer.decode(list(ids)))


@pytest.mark.parametrize("kind", KINDS)
def test_each_slot_holds_exactly_its_fields_tokens(tokenizers_by_kind, kind):
    """Byte-level BPE puts the space before a word into its token ("Ġsun" starts at the space): still the field's."""
    tokenizer = tokenizers_by_kind[kind]
    values = {"premise": "the sun was rising", "hypothesis": "the grass was wet"}
    row, _, positions = template_row(tokenizer, values, TEMPLATE, "verbalizer", "causal", 64)
    for name, value in values.items():
        assert _decoded(tokenizer, [row.ids[i] for i in positions[name]]) == _letters(value)
    assert [i for i, text in enumerate(row.text_mask) if text] == sorted(positions["premise"] + positions["hypothesis"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_candidate_token_is_scored(tokenizers_by_kind, kind):
    tokenizer = tokenizers_by_kind[kind]
    values = {"premise": "the grass was wet", "connector": "because"}
    for candidate in ("rain", "the sun was rising"):  # one word is one "Ġrain": its space must not leave it out
        row = candidate_row(tokenizer, values, candidate, "{premise} {connector} {choice}", "causal", 64)
        scored = [target for target in row.targets if target != IGNORE]
        assert _decoded(tokenizer, scored) == _letters(candidate)
        text = tokenizer(f"{values['premise']} because {candidate}", add_special_tokens=False).input_ids
        assert row.text_mask.count(True) == len(text)  # fields and candidate: every token but the special ones


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_cuts_exactly_the_excess_and_refuses_what_cannot_fit(tokenizers_by_kind, kind):
    tokenizer = tokenizers_by_kind[kind]
    values = {"premise": " ".join(["the sun was rising"] * 6), "hypothesis": "the grass was wet"}
    full, _, positions = template_row(tokenizer, values, TEMPLATE, "verbalizer", "causal", 512)
    long, short = len(positions["premise"]), len(positions["hypothesis"])
    for max_length in range(len(full.ids) - (long - short), len(full.ids), 4):  # the long field is cut, alone
        row, _, kept = template_row(tokenizer, values, TEMPLATE, "verbalizer", "causal", max_length)
        assert len(row.ids) == max_length  # the excess, token by token, from the longest field only
        assert _decoded(tokenizer, [row.ids[i] for i in kept["hypothesis"]]) == _letters(values["hypothesis"])
        assert _letters(values["premise"]).startswith(_decoded(tokenizer, [row.ids[i] for i in kept["premise"]]))
    shortest = len(full.ids) - (long - 1) - (short - 1)  # then both, longest first, down to one token each
    row, _, kept = template_row(tokenizer, values, TEMPLATE, "verbalizer", "causal", shortest)
    assert len(row.ids) == shortest and len(kept["premise"]) == len(kept["hypothesis"]) == 1
    with pytest.raises(ValueError, match="with every field cut to one token, more than max_length"):
        template_row(tokenizer, values, TEMPLATE, "verbalizer", "causal", shortest - 1)


@pytest.mark.parametrize("kind", KINDS)
def test_no_row_exceeds_max_length(tokenizers_by_kind, kind):
    tokenizer = tokenizers_by_kind[kind]
    example = {"premise": " ".join(["the sun was rising"] * 5), "hypothesis": " ".join(["the grass was wet"] * 4),
               "answer": "it was rain"}
    template = "Premise: {premise} Question: {hypothesis}? {answer} Answer:"
    refused = []
    for max_length in range(8, 70, 6):
        try:
            row, _, _ = template_row(tokenizer, example, template, "verbalizer", "causal", max_length)
        except ValueError as refusal:  # the template with one token per field does not fit
            assert "with every field cut to one token" in str(refusal)
            refused.append(max_length)
            continue
        assert len(row.ids) <= max_length
    assert refused == list(range(8, refused[-1] + 1, 6)) and refused[-1] < 62  # only the shortest are refused


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_a_pair_without_a_pair_template_gets_the_models_separator(tokenizers_by_kind, kind):
    tokenizer = tokenizers_by_kind[kind]
    first, second = "the movie was good", "it was great"
    assert tokenizer.decode(tokenizer(first, second).input_ids) == first + second  # glued: what HF gives
    row = pair_row(tokenizer, first, [second], 64)
    assert tokenizer.decode(row.ids) == first + tokenizer.eos_token + second
    assert _decoded(tokenizer, [t for t, text in zip(row.ids, row.text_mask) if text]) == _letters(first + second)
    assert len(pair_row(tokenizer, " ".join([first] * 20), [second], 16).ids) == 16


def test_a_pair_with_a_pair_template_is_the_tokenizers_own(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["wordpiece"]
    row = pair_row(tokenizer, "the movie was good", ["it was great"], 64)
    reference = tokenizer("the movie was good", "it was great")
    assert row.ids == reference.input_ids and row.segments == reference.token_type_ids


@pytest.mark.parametrize("kind", ["wordpiece", "gpt2"])
def test_a_three_field_classifier_example_keeps_its_parts_apart(tokenizers_by_kind, kind):
    """WiC (word, sentence1, sentence2): segment A the word, B the two sentences with the separator between them."""
    tokenizer = tokenizers_by_kind[kind]
    example = {"word": "rain", "sentence1": "it was rain", "sentence2": "the grass was wet"}
    row, = example_rows(tokenizer, example, "{text}", "classifier", "masked" if kind == "wordpiece" else "causal", 64)
    if kind == "wordpiece":
        assert tokenizer.decode(row.ids) == "[CLS] rain [SEP] it was rain [SEP] the grass was wet [SEP]"
        assert row.segments == [0, 0, 0] + [1] * 9
    else:
        assert tokenizer.decode(row.ids) == "rain<|endoftext|>it was rain<|endoftext|>the grass was wet"
    assert _decoded(tokenizer, [t for t, text in zip(row.ids, row.text_mask) if text]) == _letters(
        "rain it was rain the grass was wet")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template,filled", [("{text} It was {mask}.", "the movie It was great."),
                                             ("{mask} : {text}", "great : the movie")])
def test_a_label_word_is_the_token_the_text_has_at_the_mask(tokenizers_by_kind, kind, template, filled):
    """RoBERTa reads "Ġgreat" after "was " (PET, LM-BFF), the bare "great" at the start of the text."""
    tokenizer = tokenizers_by_kind[kind]
    encoded = tokenizer(filled, add_special_tokens=False, return_offsets_mapping=True)
    start = filled.index("great")
    reference = [t for t, (s, e) in zip(encoded.input_ids, encoded.offset_mapping) if s <= start < e]
    for masked_kind in ("masked", "causal"):
        assert label_word_ids(tokenizer, ["great"], masked_kind, template).tolist() == reference


def test_a_label_word_of_several_tokens_is_refused(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["roberta"]
    with pytest.raises(ValueError, match=r"label word 'sunrisinggrass' is \d+ tokens .*choose a one-token word"):
        label_word_ids(tokenizer, ["great", "sunrisinggrass"], "masked", "{text} It was {mask}.")


def test_every_benchmark_has_a_causal_form_that_reads_every_field():
    needs_a_form = {"super_glue/rte", "super_glue/cb", "glue/mrpc", "glue/qqp", "glue/qnli", "glue/mnli", "glue/rte"}
    for name, benchmark in BENCHMARKS.items():
        causal = benchmark.causal_template or benchmark.template
        check_template(causal, benchmark.fields, benchmark.choices)
        check_causal_template(causal)
        if name in needs_a_form:
            with pytest.raises(ValueError, match=r"after \{mask\}"):
                check_causal_template(benchmark.template)


def _rte_folder(root):
    folder = root / "RTE"
    folder.mkdir()
    for split, seed in (("train", 41), ("val", 42)):
        rows = toy_rows(24, seed)
        records = [{"premise": a["text"], "hypothesis": b["text"], "idx": i,
                    "label": "entailment" if a["label"] == b["label"] else "not_entailment"}
                   for i, (a, b) in enumerate(zip(rows[::2], rows[1::2]))]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_a_causal_verbalizer_reads_the_premise_after_the_mask_of_the_masked_template(tiny_dirs, tmp_path):
    """RTE's masked template puts the premise after {mask}; a causal LM gets the task's form that ends at {mask}:
    the logits change with the premise and equal HF's own forward on that text."""
    from ptp_core.tasks.load import load_task
    from ptp_core.train import TrainConfig, build_prompt_model

    folder = _rte_folder(tmp_path)
    words = ["positive", "negative"]  # the tiny vocabulary has no Yes/No
    config = TrainConfig(model=tiny_dirs["gpt2"], task=str(folder), head="verbalizer", label_words=words,
                         progress=False, dtype="float32")
    model = build_prompt_model(config, load_task(str(folder), label_words=words), "cpu")
    assert model.template == BENCHMARKS["super_glue/rte"].causal_template
    prompt = torch.randn(3, model.embedding_dim, generator=torch.Generator().manual_seed(0))
    examples = [{"premise": "the movie was good", "hypothesis": "it was great"},
                {"premise": "the plot was dull and boring", "hypothesis": "it was great"}]
    ours = model.logits({"prompt": prompt}, model.encode(examples))
    assert (ours[0] - ours[1]).abs().max() > 1e-3
    for example, row in zip(examples, ours):
        text = f'"{example["premise"]}" Question: "{example["hypothesis"]}" ? Answer:'
        ids = torch.tensor(model.tokenizer(text).input_ids)
        embeds = torch.cat([prompt, model.backbone.get_input_embeddings()(ids)])  # (P+T, D)
        with torch.no_grad():
            expected = model.backbone(inputs_embeds=embeds[None]).logits[0, -1, model.label_ids]
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5)
    refused = TrainConfig(model=tiny_dirs["gpt2"], task=str(folder), head="verbalizer", label_words=words,
                          template='"{hypothesis}" ? {mask}, "{premise}"', progress=False, dtype="float32")
    task = load_task(str(folder), label_words=words, template=refused.template)
    with pytest.raises(ValueError, match=r"places \{premise\} after \{mask\}.*put \{mask\} last"):
        build_prompt_model(refused, task, "cpu")
    with pytest.raises(ValueError, match=r"put \{mask\} last"):  # any other path refuses it when it encodes
        encode(model.tokenizer, examples, template=refused.template, head="verbalizer", kind="causal", max_length=64)


def test_a_checkpoint_without_its_template_reads_its_fields(tiny_dirs, tmp_path):
    """A verbalizer checkpoint whose ptp.json names fields but no template gets the fields' default cloze."""
    from ptp_core.model.backbones import load_backbone
    from ptp_core.checkpoint import load_checkpoint, save_checkpoint
    from ptp_core.model.prompt_model import PromptModel

    words, example = ["positive", "negative"], [{"premise": "the movie was good", "hypothesis": "it was great"}]
    model = PromptModel(load_backbone(tiny_dirs["gpt2"], "verbalizer", 2), "verbalizer", 2, words,
                        "{premise} {hypothesis} Answer: {mask}.")
    params = model.init_params(2, "random", torch.Generator().manual_seed(1))
    meta = {"model": tiny_dirs["gpt2"], "head": "verbalizer", "kind": "causal", "label_words": words, "num_labels": 2,
            "method": "pt", "seed": 0, "fields": ["premise", "hypothesis"]}
    loaded = load_checkpoint(save_checkpoint(tmp_path / "run", params, meta, None, model.backbone.config)).build_model(
        device="cpu")
    torch.testing.assert_close(loaded.predict(example), model.logits(params, model.encode(example)))


def test_a_masked_candidate_is_read_at_the_mask_when_a_space_piece_stands_before_it():
    """SentencePiece may put a lone "▁" before a mask that does not take the space: the span of the {choice} slot then
    starts at that piece, but the candidate is scored at the mask itself."""
    from families import unigram_tokenizer

    tokenizer = unigram_tokenizer("masked", mask_takes_space=False)
    row = candidate_row(tokenizer, {"premise": "the movie was good"}, "great", "{premise} It was {choice}", "masked",
                        64)
    pieces = tokenizer.convert_ids_to_tokens(row.ids)
    assert "▁" in pieces and pieces[pieces.index("[MASK]") - 1] == "▁"  # the case this test is about
    assert row.ids[row.answer] == tokenizer.mask_token_id
    (scored,) = [i for i, t in enumerate(row.targets) if t != IGNORE]
    assert scored == row.answer and tokenizer.decode([row.targets[scored]]).strip() == "great"


@pytest.mark.parametrize("kind", MASKED_KINDS)
def test_a_masked_candidate_is_the_token_the_text_has_at_the_mask(tokenizers_by_kind, kind):
    """A masked-LM multiple-choice row scores the candidate's token as the filled-in text has it ("Ġrain" after a
    space for RoBERTa), the same rule as the label words."""
    tokenizer = tokenizers_by_kind[kind]
    assert tokenizer.mask_token is not None
    filled = "the grass was wet so rain"
    encoded = tokenizer(filled, add_special_tokens=False, return_offsets_mapping=True)
    start = filled.index("rain")
    (reference,) = [t for t, (s, e) in zip(encoded.input_ids, encoded.offset_mapping) if s <= start < e]
    row = candidate_row(tokenizer, {"premise": "the grass was wet", "connector": "so"}, "rain",
                        "{premise} {connector} {choice}", "masked", 64)
    assert [t for t in row.targets if t != IGNORE] == [reference]
