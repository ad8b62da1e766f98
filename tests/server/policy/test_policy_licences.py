"""The licence catalogue: every entry cites its clauses, names resolve however a card spells
them, custom entries load from TOML and YAML, and model cards are read as YAML."""

from __future__ import annotations

import pytest

from logitcache.client.errors import InvalidArgument
from logitcache.server.policy.licences import (
    BUILT_IN,
    CATALOGUE,
    DutyKind,
    load_catalogue,
    load_custom_licences,
    model_card_licence,
    model_card_licence_of,
)


def test_the_catalogue_covers_the_licences_of_common_teachers() -> None:
    for name in [
        "apache-2.0",
        "mit",
        "llama2",
        "llama3",
        "llama3.1",
        "llama3.2",
        "llama3.3",
        "gemma",
        "bigscience-bloom-rail-1.0",
        "bigscience-openrail-m",
        "qwen",
        "qwen-research",
        "tongyi-qianwen",
        "deepseek",
    ]:
        assert CATALOGUE.get(name) is not None, name
    assert len(CATALOGUE) == len(BUILT_IN)


@pytest.mark.parametrize(
    "spelling, licence_id",
    [
        ("Apache 2.0", "apache-2.0"),
        ("APACHE_2.0", "apache-2.0"),
        ("Llama 3.1", "llama3.1"),
        ("llama-2", "llama2"),
        ("Gemma Terms of Use", "gemma"),
        ("OpenRAIL-M", "bigscience-openrail-m"),
    ],
)
def test_names_resolve_however_they_are_spelled(spelling: str, licence_id: str) -> None:
    licence = CATALOGUE.get(spelling)
    assert licence is not None and licence.id == licence_id


def test_every_entry_cites_a_section_for_each_term() -> None:
    for licence in BUILT_IN:
        clauses = [licence.outputs.clause, licence.commercial.clause, *licence.use_restrictions]
        clauses += [d.clause for d in licence.duties]
        for clause in clauses:
            assert clause.section and clause.text, licence.id
        if licence.commercial.max_monthly_active_users is not None:
            assert licence.commercial.users_clause is not None, licence.id


def test_the_llama_terms_are_recorded_as_their_licences_state_them() -> None:
    llama2 = CATALOGUE.get("llama2")
    assert llama2 is not None
    assert not llama2.outputs.may_train and llama2.outputs.only_families == ("llama2",)
    assert llama2.outputs.clause.section == "§1.b.v" and llama2.outputs.clause.quoted
    assert llama2.commercial.max_monthly_active_users == 700_000_000
    llama31 = CATALOGUE.get("llama3.1")
    assert llama31 is not None and llama31.outputs.may_train
    naming = [d for d in llama31.duties if d.kind is DutyKind.NAMING]
    assert [d.name_prefix for d in naming] == ["Llama"]
    assert any("Built with Llama" in d.text for d in llama31.duties)
    gemma = CATALOGUE.get("gemma")
    assert gemma is not None
    assert {d.kind for d in gemma.duties} >= {DutyKind.NOTICE, DutyKind.USE_RESTRICTIONS}


CUSTOM_TOML = """
[[licence]]
id = "acme-1.0"
name = "ACME Model Licence 1.0"
url = "https://example.org/acme"
aliases = ["acme"]
outputs = { may_train = false, only_families = ["acme"], clause = { section = "§4", text = "outputs train ACME models only" } }
commercial = { allowed = true, max_monthly_active_users = 1000, clause = { section = "§2", text = "commercial use granted" }, users_clause = { section = "§5", text = "above 1000 users ask ACME" } }

[[licence.duties]]
kind = "attribution"
text = "say Built with ACME"
clause = { section = "§6", text = "Built with ACME", quoted = true }

[[licence]]
id = "apache-2.0"
name = "Apache 2.0 as our lawyers read it"
url = "https://example.org/apache"
outputs = { may_train = true, clause = { section = "§1", text = "fine" } }
commercial = { allowed = false, clause = { section = "§2", text = "not for us" } }
"""

CUSTOM_YAML = """
licence:
  - id: acme-1.0
    name: ACME Model Licence 1.0
    url: https://example.org/acme
    outputs: {may_train: true, clause: {section: "§4", text: outputs may train}}
    commercial: {allowed: false, clause: {section: "§2", text: research only}}
    use_restrictions:
      - {section: "§7", text: no weapons}
"""


def test_custom_entries_load_from_toml_and_replace_built_ins_by_id(tmp_path) -> None:
    path = tmp_path / "licences.toml"
    path.write_text(CUSTOM_TOML, encoding="utf-8")
    catalogue = load_catalogue(path)
    acme = catalogue.get("ACME")
    assert acme is not None and acme.outputs.only_families == ("acme",)
    assert acme.commercial.users_clause is not None and acme.commercial.users_clause.section == "§5"
    assert acme.duties[0].kind is DutyKind.ATTRIBUTION and acme.duties[0].clause.quoted
    apache = catalogue.get("apache-2.0")
    assert apache is not None and not apache.commercial.allowed
    assert CATALOGUE.get("apache-2.0") is not None and CATALOGUE.get("acme") is None


def test_custom_entries_load_from_yaml(tmp_path) -> None:
    path = tmp_path / "licences.yaml"
    path.write_text(CUSTOM_YAML, encoding="utf-8")
    [acme] = load_custom_licences(path)
    assert acme.use_restrictions[0].text == "no weapons" and not acme.commercial.allowed


@pytest.mark.parametrize(
    "text, message",
    [
        ("licence = 3", "expected a list"),
        ('[[licence]]\nid = "x"\n', "missing"),
        ('[[licence]]\nid = "x"\ncolour = "red"\n', "unknown keys colour"),
        (
            CUSTOM_TOML.replace('kind = "attribution"', 'kind = "fame"'),
            "one of attribution",
        ),
        ("[[licence]\n", "cannot read"),
    ],
)
def test_a_bad_custom_file_names_what_is_wrong(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "licences.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidArgument, match=message):
        load_custom_licences(path)


@pytest.mark.parametrize(
    "card, declared",
    [
        ('---\nlicense: "apache-2.0"\n---\n# Model\n', "apache-2.0"),
        ("---\nlicense: 'llama3.1'\nlanguage: [en]\n---\n", "llama3.1"),
        ("---\nlicense: other\nlicense_name: qwen\nlicense_link: LICENSE\n---\n", "qwen"),
        ("---\nlicense:\n  - mit\n  - apache-2.0\n---\n", "mit"),
        ("---\r\nlicense: gemma\r\n---\r\n", "gemma"),
        ("# A card without front matter\nlicense: mit\n", None),
        ("---\nlanguage: en\n---\n", None),
        ("---\nlicense: [unclosed\n---\n", None),
        ("---\n- a list\n---\n", None),
    ],
)
def test_a_model_cards_licence_is_read_as_yaml(card: str, declared: str | None) -> None:
    assert model_card_licence(card) == declared


def test_a_model_directory_without_a_card_declares_nothing(tmp_path) -> None:
    assert model_card_licence_of(tmp_path) is None
    (tmp_path / "README.md").write_text('---\nlicense: "mit"\n---\n', encoding="utf-8")
    assert model_card_licence_of(tmp_path) == "mit"
