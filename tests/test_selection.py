"""The selection-mode table (perpcs/method/selection.py): four named modes, each picked by one setting of the two
flags, as the published code numbered them; the numbers and the recipes' settings stay as they were."""
import pytest
import torch

from perpcs.method.composition import ComposeSettings
from perpcs.method.selection import SELECTION_MODES, mode_name

# the published rule: (--sample, --sample_top_p set) -> mode number
PUBLISHED = {(False, False): 1, (False, True): 2, (True, True): 3, (True, False): 4}


def test_the_table_holds_the_four_published_modes_each_picked_by_one_flag_setting():
    assert list(SELECTION_MODES) == ["top_k", "nucleus", "sampled_nucleus_top_k", "sampled_top_k"]
    assert {(m.sample, m.top_p): m.number for m in SELECTION_MODES.values()} == PUBLISHED
    for name, entry in SELECTION_MODES.items():
        assert entry.choose.__name__ == name            # the function is the mode's name
        assert callable(entry.describe) and callable(entry.check)


@pytest.mark.parametrize("name", list(SELECTION_MODES))
def test_each_mode_name_round_trips_from_the_flags(name):
    entry = SELECTION_MODES[name]
    top_p = 0.5 if entry.top_p else None
    settings = ComposeSettings(sample=entry.sample, sample_top_p=top_p)
    assert mode_name(entry.sample, top_p) == settings.selection == name
    assert settings.selection_mode == entry.number == PUBLISHED[(entry.sample, entry.top_p)]
    assert settings.describe().startswith(f"mode {entry.number}: ")


def test_the_mode_is_no_field_so_recipes_store_the_same_settings():
    """make_recipe stores settings.recorded(): the mode must stay derived, never a field (and the opt-in
    --score_calibration is recorded only when set)."""
    assert list(ComposeSettings().recorded()) == ["topk", "agg_temperature", "share_ratio", "epochs", "batch_size",
                                             "recent_k", "seed", "sample", "sample_topk", "sample_temperature",
                                             "sample_top_p"]


def test_sampled_modes_draw_through_the_given_draw_function():
    """The modes draw only through ``draw`` (the composer's seeded generator), k = --topk pieces."""
    s = torch.tensor([0.3, 1.2, -0.4, 0.9, 0.1, 1.0])
    order = torch.sort(-s, stable=True).indices
    calls = []

    def draw(probs, k):
        calls.append((probs.clone(), k))
        return torch.arange(k)

    settings = ComposeSettings(topk=2, sample=True, sample_topk=3, sample_top_p=0.5)
    chosen = SELECTION_MODES["sampled_top_k"].choose(s, order, settings, draw)
    assert chosen.tolist() == order[:2].tolist() and calls[-1][1] == 2 and len(calls[-1][0]) == 3
    SELECTION_MODES["sampled_nucleus_top_k"].choose(s, order, settings, draw)
    assert len(calls) == 2 and len(calls[-1][0]) == len(s)          # over the pool, in pool order
    for name in ("top_k", "nucleus"):
        SELECTION_MODES[name].choose(s, order, settings, draw)
    assert len(calls) == 2                                           # the unsampled modes draw nothing
