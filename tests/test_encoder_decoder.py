"""Encoder-decoder MoE models under ``generate()``: the encoder runs on its own, before the
decoding steps, outside the model's forward; its padding is still not traffic, and its rows
and the decoding steps' are the same requests."""
from __future__ import annotations

import warnings

import pytest
import torch

import moewatch
from hf_zoo_special import tiny_model

NEW_TOKENS = 4


@pytest.mark.parametrize("family", ["switch_transformers", "nllb_moe"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_counts_the_encoders_real_tokens_and_every_decoder_token(family, cache):
    model = tiny_model(family)
    ids = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    with moewatch.attach(model, background=False) as mon, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       do_sample=False, cache_implementation=cache, pad_token_id=0, decoder_start_token_id=0)
        mon.flush()
        windows = mon.windows()
        tokens = windows.groupby("gate")["tokens"].sum()
        assert mon.errors.total() == 0
    # three requests: each decoding step goes on with the rows the encoder ran (not 3 new ones a step)
    assert len(windows) == windows["gate"].nunique()  # one window: requests are counted within it
    assert windows["requests"].tolist() == [3.0] * len(windows)
    encoder = [name for name in tokens.index if "encoder" in name]
    decoder = [name for name in tokens.index if "decoder" in name]
    assert encoder and decoder
    assert tokens[encoder].tolist() == [int(mask.sum())] * len(encoder)  # 19 of 24
    # a decoding step per new token (fed the start token, then each new token but the last), 3 rows each
    assert tokens[decoder].tolist() == [3 * NEW_TOKENS] * len(decoder)


@pytest.mark.parametrize("family", ["switch_transformers", "nllb_moe"])
def test_forwards_given_both_inputs_count_their_rows_as_new_requests(family):
    """A training or evaluation forward (encoder and decoder inputs together) is its batch's
    rows: two forwards of 3 rows are 6 requests, the second does not go on with the first."""
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(2)
    with moewatch.attach(model, background=False) as mon, torch.no_grad():
        for _ in range(2):
            model(input_ids=torch.randint(3, 100, (3, 8), generator=generator),
                  decoder_input_ids=torch.randint(3, 100, (3, 5), generator=generator))
        mon.flush()
        windows = mon.windows()
        assert mon.errors.total() == 0
    assert len(windows) == windows["gate"].nunique()
    assert windows["requests"].tolist() == [6.0] * len(windows)


@pytest.mark.parametrize("backend", ["staged", "device"])
@pytest.mark.parametrize("family", ["switch_transformers", "nllb_moe"])
def test_windows_never_end_between_the_encoder_and_the_decoder_of_a_forward(family, backend):
    """A forward given both inputs runs the encoder inside the model's call (a nested forward):
    windows filling at every forward are cut at the model's forward ends only, so every window
    holds whole forwards at every gate. On the device backend the encoder's end cut a window
    before the decoder ran: the decoder's gates had 0 tokens there (every expert looked dead),
    and the forward's decoder tokens went into the next window."""
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(2)
    forwards = 5
    with moewatch.attach(model, background=False, backend=backend, window_tokens=20) as mon, torch.no_grad():
        for _ in range(forwards):
            model(input_ids=torch.randint(3, 100, (3, 8), generator=generator),
                  decoder_input_ids=torch.randint(3, 100, (3, 5), generator=generator))
        mon.flush()
        windows = mon.windows()
        assert mon.errors.total() == 0
    tokens = windows.pivot(index="window", columns="gate", values="tokens")
    encoder = [name for name in tokens.columns if "encoder" in name]
    decoder = [name for name in tokens.columns if "decoder" in name]
    assert encoder and decoder
    assert len(tokens) == forwards  # a window a forward: each one fills it (24 encoder tokens >= 20)
    assert (tokens[encoder] == 3 * 8).all().all()
    assert (tokens[decoder] == 3 * 5).all().all()
