"""PTP on --head lm: every perturbation touches input tokens only, and the PTP loss is HF's labels loss.

One PTP step per method x target on a padded --head lm batch of a tiny causal LM (GPT-2) and a tiny encoder-decoder
(T5). What the backbone is fed is recorded at its forward; the references are built here from the tokenizer's own
encoding: the rows (input, then target and eos; or the target in the decoder), the input text's positions (never
the template's, a target's or padding), the noise drawn from the same seed, PGD / SAM / HotFlip from HF's own
gradient of its `labels` loss, and the loss itself as HF's `labels` loss on the recorded inputs (float32, computed by
HF's forward, not ours).
"""
from __future__ import annotations

import math

import pytest
import torch

from ptp_core.training.perturb import PerturbConfig, ptp_loss

TEMPLATE = "Review : {text} ."
EXAMPLES = [{"text": "the movie was really good and the acting superb", "target": "great fun"},
            {"text": "dull", "target": "the plot was boring and the story quite weak"},
            {"text": "a lovely film", "target": "fun"}]
PROMPT_LENGTH = 3
WEIGHT = 0.7  # lam, away from 1 so that a swapped clean and perturbed term shows
# (method, settings): every target's random and adversarial method, FreeLB and a two-step PGD
CASES = {
    "rn-input": ("ptp-rn", dict(target="input", sigma=0.5)),
    "adv-input": ("ptp-adv", dict(target="input", epsilon=0.3)),
    "adv-input-pgd2": ("ptp-adv", dict(target="input", epsilon=0.3, adv_steps=2)),
    "adv-input-free": ("ptp-adv", dict(target="input", epsilon=0.3, adv_steps=2, adv_free=True)),
    "rn-prompt": ("ptp-rn", dict(target="prompt", sigma=0.5)),
    "adv-prompt": ("ptp-adv", dict(target="prompt", rho=0.3)),
    "rn-text": ("ptp-rn", dict(target="text", mask_rate=0.5)),
    "adv-text": ("ptp-adv", dict(target="text", swaps=2)),
}


class Setup:
    """A --head lm PromptModel, its params, the batch, and the reference rows from the tokenizer's own encoding."""

    def __init__(self, model_dir: str):
        from ptp_core.model.backbones import load_backbone
        from ptp_core.model.prompt_model import PromptModel

        backbone = load_backbone(model_dir, "lm", 0)
        self.model = PromptModel(backbone, "lm", 0, [], TEMPLATE)
        self.tok, self.kind = self.model.tokenizer, self.model.kind
        generator = torch.Generator().manual_seed(0)
        prompt = self.model.init_params(PROMPT_LENGTH, "random", generator)["prompt"]
        self.params = {"prompt": prompt + 0.3 * torch.randn(prompt.shape, generator=generator)}
        self.batch = self.model.encode(EXAMPLES, [-1] * len(EXAMPLES))
        self.table = self.model.backbone.get_input_embeddings().weight.detach()  # (V, D)
        self._reference_rows()

    def _reference_rows(self) -> None:
        """Token rows, the input text's positions and HF `labels`, from tokenizer calls on the pieces."""
        tok, rows, texts, labels, decoder = self.tok, [], [], [], []
        for example in EXAMPLES:
            before = tok("Review :", add_special_tokens=False).input_ids
            text = tok(example["text"], add_special_tokens=False).input_ids
            encoded = tok(f"Review : {example['text']} .").input_ids  # the tokenizer's own specials (T5: eos)
            assert encoded[len(before):len(before) + len(text)] == text
            if self.kind == "seq2seq":
                rows.append(encoded)
                decoder.append(tok(example["target"]).input_ids)  # HF's labels in PEFT's seq2seq guide
            else:
                target = tok(" " + example["target"], add_special_tokens=False).input_ids + [tok.eos_token_id]
                rows.append(encoded + target)
                labels.append([-100] * len(encoded) + target)
            texts.append(set(range(len(before), len(before) + len(text))))
        width, self.lengths = max(map(len, rows)), [len(r) for r in rows]
        self.ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])  # (R, T)
        self.text_mask = torch.tensor([[t in positions for t in range(width)] for positions in texts])  # (R, T)
        if self.kind == "seq2seq":
            length = max(map(len, decoder))
            self.labels = torch.tensor([d + [-100] * (length - len(d)) for d in decoder])  # (R, Tc)
        else:  # the virtual tokens first: HF's labels line up with the prompted sequence
            self.labels = torch.tensor([[-100] * PROMPT_LENGTH + row + [-100] * (width - len(row)) for row in labels])

    # ---- HF's labels loss on what the backbone was fed ------------------------------------------------------
    def hf_loss(self, fed: dict) -> torch.Tensor:
        """HF's `labels` loss (the token mean over the batch) of its own full forward on recorded inputs."""
        out = self.model.backbone(inputs_embeds=fed["inputs_embeds"], attention_mask=fed["attention_mask"],
                                  labels=self.labels)
        return out.loss

    def clean_embeds(self, prompt: torch.Tensor) -> torch.Tensor:
        """(R, P+T, D) the virtual tokens, then the reference rows' word embeddings."""
        words = self.table[self.ids]  # (R, T, D)
        return torch.cat([prompt.detach().expand(len(EXAMPLES), -1, -1), words], dim=1)

    def input_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's gradient of its labels loss at the clean input: w.r.t. the prompt (P, D) and the words (R, T, D)."""
        embeds = self.clean_embeds(self.params["prompt"]).clone().requires_grad_(True)
        loss = self.hf_loss({"inputs_embeds": embeds, "attention_mask": self.attention()})
        (gradient,) = torch.autograd.grad(loss, [embeds])
        return gradient[:, :PROMPT_LENGTH].sum(0), gradient[:, PROMPT_LENGTH:]

    def attention(self) -> torch.Tensor:
        """(R, P+T) the virtual tokens and each row's real tokens."""
        real = (torch.arange(self.ids.shape[1]) < torch.tensor(self.lengths).unsqueeze(1)).long()  # (R, T)
        return torch.cat([torch.ones(len(EXAMPLES), PROMPT_LENGTH, dtype=torch.long), real], dim=1)

    def rms(self) -> float:
        return self.table.double().pow(2).mean().sqrt().item()


@pytest.fixture(scope="module", params=["causal", "seq2seq"])
def setup(request, tiny_dirs, family_dirs):
    return Setup(tiny_dirs["gpt2"] if request.param == "causal" else family_dirs["t5"])


def _recorded_step(setup: Setup, method: str, settings: dict) -> tuple[torch.Tensor, dict, list[dict]]:
    """One ptp_loss at weight lam; what every backbone forward was fed, in order (the clean pass first)."""
    fed = []
    module = setup.model.backbone if setup.kind == "seq2seq" else setup.model.backbone.base_model

    def record(_, args, kwargs):
        fed.append({k: kwargs[k].detach().clone() for k in ("inputs_embeds", "attention_mask", "decoder_input_ids")
                    if k in kwargs})

    params = {k: v.detach().clone().requires_grad_(True) for k, v in setup.params.items()}
    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        loss, parts = ptp_loss(setup.model, params, setup.batch, method, PerturbConfig(**settings),
                               torch.Generator().manual_seed(0), reg_weight=WEIGHT)
    finally:
        handle.remove()
    return loss, parts, fed


def test_the_lm_batch_is_the_tokenizers_own_rows(setup):
    """The reference rows: input ids, the text mask on the input field only, the targets (HF's labels, shifted)."""
    batch = setup.batch
    assert torch.equal(batch.input_ids, setup.ids) and torch.equal(batch.text_mask, setup.text_mask)
    if setup.kind == "seq2seq":
        assert torch.equal(batch.target_ids, setup.labels)
    else:  # targets[p] is the token position p + 1 holds: HF's labels moved left by one
        assert torch.equal(batch.target_ids[:, :-1], setup.labels[:, PROMPT_LENGTH + 1:])
        assert (batch.target_ids[:, -1] == -100).all()


@pytest.mark.parametrize("case", list(CASES))
def test_ptp_on_lm_perturbs_input_tokens_only_and_is_clean_plus_lam_perturbed(setup, case):
    method, settings = CASES[case]
    loss, parts, fed = _recorded_step(setup, method, settings)
    clean, perturbed = fed[0], fed[1:] if settings.get("adv_free") else fed[-1:]
    assert len(fed) == 1 + settings.get("adv_steps", 1)  # the clean pass, K - 1 ascent passes, the perturbed one
    # the clean pass is the reference rows behind the prompt
    expected = setup.clean_embeds(setup.params["prompt"])
    assert torch.allclose(clean["inputs_embeds"], expected, atol=1e-6)
    assert torch.equal(clean["attention_mask"], setup.attention())
    target = settings["target"]
    outside = ~setup.text_mask.unsqueeze(-1)  # (R, T, 1): the template, the target, eos and padding
    for step in perturbed:
        delta = step["inputs_embeds"] - clean["inputs_embeds"]  # (R, P+T, D)
        words, virtual = delta[:, PROMPT_LENGTH:], delta[:, :PROMPT_LENGTH]
        assert torch.equal(step["attention_mask"], clean["attention_mask"])
        assert torch.count_nonzero(words * outside) == 0, "a perturbation reached the template or a target token"
        if setup.kind == "seq2seq":  # the teacher-forced target in the decoder: untouched, HF's shifted labels
            shifted = setup.model.backbone._shift_right(setup.labels)
            assert torch.equal(step["decoder_input_ids"], shifted) and torch.equal(clean["decoder_input_ids"], shifted)
        if target == "prompt":
            assert torch.count_nonzero(words) == 0 and torch.count_nonzero(virtual) > 0
        else:
            assert torch.count_nonzero(virtual) == 0 and torch.count_nonzero(words) > 0
    # L = CE(clean) + lam * CE(perturbed), each HF's labels loss on what the backbone was fed
    with torch.no_grad():
        clean_ref = setup.hf_loss(clean).item()
        perturbed_ref = sum(setup.hf_loss(step).item() for step in perturbed) / len(perturbed)
    assert parts["clean_loss"].item() == pytest.approx(clean_ref, abs=1e-5)
    assert parts["perturbed_loss"].item() == pytest.approx(perturbed_ref, abs=1e-5)
    assert loss.item() == pytest.approx(clean_ref + WEIGHT * perturbed_ref, abs=1e-5)
    assert abs(perturbed_ref - clean_ref) > 1e-4  # the perturbation did something


def _words_delta(setup: Setup, method: str, settings: dict) -> torch.Tensor:
    _, _, fed = _recorded_step(setup, method, settings)
    return (fed[-1]["inputs_embeds"] - fed[0]["inputs_embeds"])[:, PROMPT_LENGTH:]  # (R, T, D)


def test_random_input_noise_is_the_seeded_draw_on_the_text_only(setup):
    """ptp-rn input: N(0, (sigma RMS(E))^2) from the run's generator, kept on the input text's tokens."""
    sigma = CASES["rn-input"][1]["sigma"]
    delta = _words_delta(setup, *CASES["rn-input"])
    noise = torch.randn((*setup.ids.shape, setup.table.shape[1]), generator=torch.Generator().manual_seed(0))
    expected = noise * sigma * setup.rms() * setup.text_mask.unsqueeze(-1)
    assert torch.allclose(delta, expected, atol=1e-5)


def test_pgd_step_follows_hfs_input_gradient_within_the_ball(setup):
    """ptp-adv input, K = 1: the random start at adv_init * r, one step of r along HF's normalized gradient of its
    labels loss w.r.t. the input text's embeddings, projected on the ball r = eps RMS(E) sqrt(text tokens * D)."""
    method, settings = CASES["adv-input"]
    config = PerturbConfig(**settings)
    delta = _words_delta(setup, method, settings).double()
    mask = setup.text_mask.unsqueeze(-1).double()
    dim = setup.table.shape[1]
    radius = (config.epsilon * setup.rms() * (setup.text_mask.sum(1).double() * dim).sqrt()).view(-1, 1, 1)
    start = torch.randn(delta.shape, generator=torch.Generator().manual_seed(0)).double() * mask
    start = start / start.flatten(1).norm(dim=1).view(-1, 1, 1) * radius * config.adv_init
    _, gradient = setup.input_gradients()
    gradient = gradient.double() * mask  # w.r.t. the input text only
    step = start + radius * gradient / gradient.flatten(1).norm(dim=1).view(-1, 1, 1)
    expected = step * (radius / step.flatten(1).norm(dim=1).view(-1, 1, 1)).clamp(max=1)
    assert torch.allclose(delta, expected, atol=1e-5)
    assert (delta.flatten(1).norm(dim=1) <= radius.flatten() * (1 + 1e-6)).all()


def test_sam_offset_follows_hfs_prompt_gradient(setup):
    """ptp-adv prompt, K = 1: SAM's e = rho sqrt(P D) RMS(E) g / |g|, g HF's gradient w.r.t. the virtual tokens."""
    method, settings = CASES["adv-prompt"]
    _, _, fed = _recorded_step(setup, method, settings)
    offset = (fed[-1]["inputs_embeds"] - fed[0]["inputs_embeds"])[:, :PROMPT_LENGTH].double()  # (R, P, D)
    gradient, _ = setup.input_gradients()
    radius = settings["rho"] * math.sqrt(gradient.numel()) * setup.rms()
    expected = radius * gradient.double() / gradient.double().norm()
    assert all(torch.allclose(row, expected, atol=1e-5) for row in offset)


def test_random_prompt_noise_is_the_seeded_draw(setup):
    method, settings = CASES["rn-prompt"]
    _, _, fed = _recorded_step(setup, method, settings)
    offset = (fed[-1]["inputs_embeds"] - fed[0]["inputs_embeds"])[:, :PROMPT_LENGTH]
    noise = torch.randn(setup.params["prompt"].shape, generator=torch.Generator().manual_seed(0))
    assert all(torch.allclose(row, noise * settings["sigma"] * setup.rms(), atol=1e-5) for row in offset)


def _fed_ids(setup: Setup, method: str, settings: dict) -> torch.Tensor:
    """(R, T) the token ids of the perturbed pass, read back from its word embeddings (the table's rows)."""
    _, _, fed = _recorded_step(setup, method, settings)
    words = fed[-1]["inputs_embeds"][:, PROMPT_LENGTH:]  # (R, T, D)
    distances = torch.cdist(words.reshape(-1, words.shape[-1]), setup.table,
                            compute_mode="donot_use_mm_for_euclid_dist")  # (R*T, V)
    value, ids = distances.min(-1)
    assert value.max() == 0  # every position is exactly a token's embedding
    return ids.reshape(setup.ids.shape)


def _special(setup: Setup) -> set[int]:
    return set(setup.tok.all_special_ids)


def test_text_masking_is_the_seeded_draw_on_input_words(setup):
    """ptp-rn text: each input word (not a special token) masked with probability mask_rate, drawn (R, T) from the
    run's generator; the template, targets, eos and padding keep their ids."""
    method, settings = CASES["rn-text"]
    ids = _fed_ids(setup, method, settings)
    draw = torch.rand(tuple(setup.ids.shape), generator=torch.Generator().manual_seed(0))
    special = torch.tensor(sorted(_special(setup)))
    chosen = (draw < settings["mask_rate"]) & setup.text_mask & ~torch.isin(setup.ids, special)
    mask_id = next(i for i in (setup.tok.mask_token_id, setup.tok.unk_token_id) if i is not None)
    assert chosen.any() and torch.equal(ids, setup.ids.masked_fill(chosen, mask_id))


def test_hotflip_swaps_input_words_by_hfs_gradient_of_the_lm_loss(setup):
    """ptp-adv text: at most `swaps` substitutions per row, each the position and token of the largest first-order
    increase g_t . (E_v - E_x_t) of HF's labels loss (float64 here), over input words only and never to a special
    token; targets and the template keep their ids."""
    method, settings = CASES["adv-text"]
    ids = _fed_ids(setup, method, settings)
    _, gradient = setup.input_gradients()
    table = setup.table.double()
    expected = setup.ids.clone()
    special = sorted(_special(setup))
    for r in range(len(EXAMPLES)):
        gains = []  # (gain, position, token) for every input word
        for t in setup.text_mask[r].nonzero().flatten().tolist():
            if setup.ids[r, t].item() in special:
                continue
            gain = gradient[r, t].double() @ (table - table[setup.ids[r, t]]).T  # (V,)
            gain[special] = -math.inf
            gain[setup.ids[r, t]] = -math.inf
            gains.append((gain.max().item(), t, gain.argmax().item()))
        for value, t, token in sorted(gains, reverse=True)[:settings["swaps"]]:
            if value > 0:
                expected[r, t] = token
    assert not torch.equal(expected, setup.ids) and torch.equal(ids, expected)
