"""FlamingoConfig's own checks: special tokens that would be taken for one another are refused."""

from __future__ import annotations

import pytest

from flamingo_fast.config import from_name

TINY = from_name("tiny")


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(eoc_token_id=TINY.media_token_id), r"media_token_id=97: equal to eoc_token_id"),
        (dict(pad_token_id=TINY.media_token_id), r"media_token_id=97: equal to pad_token_id"),
        (dict(media_token_id=TINY.eos_token_id), r"media_token_id=2: equal to eos_token_id"),
        (dict(media_token_id=TINY.bos_token_id), r"media_token_id=1: equal to bos_token_id"),
        (dict(pad_token_id=TINY.eoc_token_id), r"eoc_token_id=96: equal to pad_token_id"),
        (dict(eoc_token_id=TINY.eos_token_id), r"eoc_token_id=2: equal to eos_token_id"),
    ],
)
def test_equal_special_token_ids_are_refused(changes, match):
    with pytest.raises(ValueError, match=match + r"; expected <image> and <\|endofchunk\|> to have ids of their own"):
        TINY.replace(**changes)


def test_shared_bos_eos_and_pad_are_accepted():
    # GPT-NeoX's tokenizer uses one id for bos and eos, and Hugging Face often pads with eos
    config = TINY.replace(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    assert config.bos_token_id == config.eos_token_id == config.pad_token_id == 0
