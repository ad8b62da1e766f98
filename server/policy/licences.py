"""The licence catalogue: what a teacher's licence says about training a student on its outputs.

Each entry records, clause by clause, whether outputs may train other models and on what
conditions, the commercial terms (with user thresholds), the use restrictions, and the
attribution and naming duties that fall on a student's authors. A :class:`Clause` is a verbatim
excerpt only where ``quoted`` is true; otherwise it paraphrases the cited section. The catalogue
is a reading of the licence texts to make a policy decision explainable, not legal advice: a lab
reviews it, and overrides or extends it with its own entries (:func:`load_custom_licences`).

A teacher's licence comes from its configuration or from its model card's front matter
(:func:`model_card_licence`); one that is in neither, or that the catalogue does not know, is
refused until an admin declares one.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from logitcache.client.errors import InvalidArgument


def normalise(name: str) -> str:
    """The form names are compared in: "Apache 2.0", "apache-2.0" and "APACHE_2.0" are one."""
    return re.sub(r"[^a-z0-9.]", "", name.lower())


@dataclass(frozen=True)
class Clause:
    """A cited part of a licence: its section and either a short verbatim excerpt (``quoted``)
    or a paraphrase of it."""

    section: str
    text: str
    quoted: bool = False

    def cite(self, licence: str) -> str:
        text = f"\u201c{self.text}\u201d" if self.quoted else self.text
        return f"{licence} {self.section}: {text}"


class DutyKind(StrEnum):
    ATTRIBUTION = "attribution"  # a "Built with ..." line where the student is published
    NAMING = "naming"  # the student's name must begin with a given prefix
    NOTICE = "notice"  # a notice file or text that ships with the student
    LICENCE_COPY = "licence-copy"  # the licence travels with the student
    USE_RESTRICTIONS = "use-restrictions"  # restricted uses bind the student and its users


@dataclass(frozen=True)
class Duty:
    """What a student's authors must do when they distribute or publish the student."""

    kind: DutyKind
    text: str
    clause: Clause
    name_prefix: str | None = None  # NAMING: the prefix the student's name must begin with


@dataclass(frozen=True)
class OutputTerms:
    """Whether the teacher's outputs may train (improve) another model. When ``may_train`` is
    false, only students of ``only_families`` (the licensed model's own derivatives) may."""

    may_train: bool
    clause: Clause
    only_families: tuple[str, ...] = ()


@dataclass(frozen=True)
class CommercialTerms:
    """Whether commercial use is granted, and the user count above which a separate licence
    is needed (for every use, or for commercial use only)."""

    allowed: bool
    clause: Clause
    max_monthly_active_users: int | None = None
    users_clause: Clause | None = None
    users_limit_commercial_only: bool = False


@dataclass(frozen=True)
class Licence:
    id: str
    name: str
    url: str
    outputs: OutputTerms
    commercial: CommercialTerms
    use_restrictions: tuple[Clause, ...] = ()
    duties: tuple[Duty, ...] = ()
    aliases: tuple[str, ...] = field(default=(), compare=False)


# --- permissive licences ---------------------------------------------------------------------

APACHE_2 = Licence(
    id="apache-2.0",
    name="Apache License 2.0",
    url="https://www.apache.org/licenses/LICENSE-2.0",
    aliases=("apache 2.0", "apache license 2.0", "apache2"),
    outputs=OutputTerms(
        True,
        Clause(
            "§2, §4",
            "the grant covers the Work and its Derivative Works, and its conditions (§4) apply "
            "to redistributing them; nothing limits the use of a model's outputs",
        ),
    ),
    commercial=CommercialTerms(
        True,
        Clause(
            "§2",
            "perpetual, worldwide, non-exclusive, no-charge, royalty-free, irrevocable "
            "copyright license",
            quoted=True,
        ),
    ),
)

MIT = Licence(
    id="mit",
    name="MIT License",
    url="https://opensource.org/license/mit",
    aliases=("mit license",),
    outputs=OutputTerms(
        True,
        Clause(
            "permission notice",
            "its one condition (keep the notice) applies to copies or substantial portions of "
            "the Software; nothing limits the use of a model's outputs",
        ),
    ),
    commercial=CommercialTerms(
        True,
        Clause(
            "permission notice",
            "to deal in the Software without restriction, including without limitation the "
            "rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell",
            quoted=True,
        ),
    ),
)

# --- Meta Llama --------------------------------------------------------------------------------


def _llama_users(release: str) -> CommercialTerms:
    """§2 of every Llama community licence: above 700M monthly active users, ask Meta."""
    return CommercialTerms(
        True,
        Clause(
            "§1.a",
            "a non-exclusive, worldwide, non-transferable and royalty-free limited licence, "
            "commercial use included",
        ),
        max_monthly_active_users=700_000_000,
        users_clause=Clause(
            "§2",
            f"if the licensee's products or services had more than 700 million monthly active "
            f"users on the {release} release date, a licence must be requested from Meta, and "
            "no rights are granted until Meta grants it",
        ),
    )


def _llama_aup(version: str) -> Clause:
    return Clause(
        "§1.b.iv",
        f"use of the Llama Materials must comply with applicable law and the {version} "
        "Acceptable Use Policy, incorporated into the agreement",
    )


def _llama_common_duties(version: str, notice: str) -> tuple[Duty, ...]:
    return (
        Duty(
            DutyKind.LICENCE_COPY,
            f"ship a copy of the {version} Community License with the student",
            Clause("§1.b.i", "a copy of the agreement goes with any distribution"),
        ),
        Duty(
            DutyKind.NOTICE,
            f'ship a "Notice" text file that reads: {notice}',
            Clause("§1.b.iii", notice, quoted=True),
        ),
        Duty(
            DutyKind.USE_RESTRICTIONS,
            f"the student may not be used in ways the {version} Acceptable Use Policy prohibits",
            _llama_aup(version),
        ),
    )


LLAMA_2 = Licence(
    id="llama2",
    name="Llama 2 Community License Agreement",
    url="https://ai.meta.com/llama/license/",
    aliases=("llama 2 community license", "llama-2"),
    outputs=OutputTerms(
        False,
        Clause(
            "§1.b.v",
            "You will not use the Llama Materials or any output or results of the Llama "
            "Materials to improve any other large language model (excluding Llama 2 or "
            "derivative works thereof).",
            quoted=True,
        ),
        only_families=("llama2",),
    ),
    commercial=_llama_users("Llama 2"),
    use_restrictions=(_llama_aup("Llama 2"),),
    duties=_llama_common_duties(
        "Llama 2",
        "Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta "
        "Platforms, Inc. All Rights Reserved.",
    ),
)

LLAMA_3 = Licence(
    id="llama3",
    name="Meta Llama 3 Community License Agreement",
    url="https://www.llama.com/llama3/license/",
    aliases=("meta llama 3 community license", "llama-3"),
    outputs=OutputTerms(
        False,
        Clause(
            "§1.b.v",
            "You will not use the Llama Materials or any output or results of the Llama "
            "Materials to improve any other large language model (excluding Meta Llama 3 or "
            "derivative works thereof).",
            quoted=True,
        ),
        only_families=("llama3", "metallama3"),
    ),
    commercial=_llama_users("Meta Llama 3"),
    use_restrictions=(_llama_aup("Meta Llama 3"),),
    duties=(
        Duty(
            DutyKind.ATTRIBUTION,
            'display "Built with Meta Llama 3" where the student is published',
            Clause(
                "§1.b.i",
                "prominently display \u201cBuilt with Meta Llama 3\u201d on a related website, "
                "user interface, blogpost, about page, or product documentation",
                quoted=True,
            ),
        ),
        Duty(
            DutyKind.NAMING,
            'the student\'s name must begin with "Llama 3"',
            Clause(
                "§1.b.i",
                "include \u201cLlama 3\u201d at the beginning of any such AI model name",
                quoted=True,
            ),
            name_prefix="Llama 3",
        ),
        *_llama_common_duties(
            "Meta Llama 3",
            "Meta Llama 3 is licensed under the Meta Llama 3 Community License, Copyright © "
            "Meta Platforms, Inc. All Rights Reserved.",
        ),
    ),
)


def _llama_3x(version: str, url: str, extra_restrictions: tuple[Clause, ...] = ()) -> Licence:
    """Llama 3.1, 3.2 and 3.3: outputs may train any model, which then carries the Llama name
    and a "Built with Llama" line (§1.b.i)."""
    naming = Clause(
        "§1.b.i",
        "If you use the Llama Materials or any outputs or results of the Llama Materials to "
        "create, train, fine tune, or otherwise improve an AI model, which is distributed or "
        "made available, you shall also include \u201cLlama\u201d at the beginning of any such "
        "AI model name.",
        quoted=True,
    )
    return Licence(
        id=normalise(version),
        name=f"{version} Community License Agreement",
        url=url,
        aliases=(f"{version} community license", version.replace(" ", "-")),
        outputs=OutputTerms(True, naming),
        commercial=_llama_users(version),
        use_restrictions=(_llama_aup(version), *extra_restrictions),
        duties=(
            Duty(
                DutyKind.ATTRIBUTION,
                'display "Built with Llama" where the student is published',
                Clause(
                    "§1.b.i",
                    "prominently display \u201cBuilt with Llama\u201d on a related website, "
                    "user interface, blogpost, about page, or product documentation",
                    quoted=True,
                ),
            ),
            Duty(
                DutyKind.NAMING,
                'the student\'s name must begin with "Llama"',
                naming,
                name_prefix="Llama",
            ),
            *_llama_common_duties(
                version,
                f"{version} is licensed under the {version} Community License, Copyright © "
                "Meta Platforms, Inc. All Rights Reserved.",
            ),
        ),
    )


LLAMA_3_1 = _llama_3x("Llama 3.1", "https://www.llama.com/llama3_1/license/")
LLAMA_3_2 = _llama_3x(
    "Llama 3.2",
    "https://www.llama.com/llama3_2/license/",
    (
        Clause(
            "Acceptable Use Policy",
            "for the multimodal Llama 3.2 models, the §1.a rights are not granted to "
            "individuals domiciled in, or companies with their principal place of business in, "
            "the European Union",
        ),
    ),
)
LLAMA_3_3 = _llama_3x("Llama 3.3", "https://www.llama.com/llama3_3/license/")

# --- Google Gemma ------------------------------------------------------------------------------

GEMMA = Licence(
    id="gemma",
    name="Gemma Terms of Use",
    url="https://ai.google.dev/gemma/terms",
    aliases=("gemma terms of use",),
    outputs=OutputTerms(
        True,
        Clause(
            "§1 (Model Derivatives)",
            "a model trained by distillation on Gemma's outputs or on synthetic data it "
            "generates, to perform similarly to Gemma, is a Model Derivative, so the "
            "distribution terms of §3.1 apply to the student",
        ),
    ),
    commercial=CommercialTerms(
        True,
        Clause(
            "§2",
            "use, reproduction, modification and distribution, commercial included, are "
            "granted subject to the Terms; no user-count threshold",
        ),
    ),
    use_restrictions=(
        Clause(
            "§3.2",
            "no use for the restricted uses of the Gemma Prohibited Use Policy, incorporated by "
            "reference, or in violation of applicable laws and regulations",
        ),
    ),
    duties=(
        Duty(
            DutyKind.USE_RESTRICTIONS,
            "put the §3.2 use restrictions as an enforceable provision into the terms the "
            "student is distributed under, and tell recipients they apply",
            Clause("§3.1", "the use restrictions flow down to every Model Derivative"),
        ),
        Duty(
            DutyKind.LICENCE_COPY,
            "give recipients of the student a copy of the Gemma Terms of Use",
            Clause("§3.1", "a copy of the agreement goes with any distribution"),
        ),
        Duty(
            DutyKind.NOTICE,
            'ship a "Notice" text file that reads: Gemma is provided under and subject to the '
            "Gemma Terms of Use found at ai.google.dev/gemma/terms",
            Clause(
                "§3.1",
                "Gemma is provided under and subject to the Gemma Terms of Use found at "
                "ai.google.dev/gemma/terms",
                quoted=True,
            ),
        ),
    ),
)

# --- Responsible AI licences: BigScience RAIL, OpenRAIL-M, DeepSeek ---------------------------

_RAIL_DISTILLATION = Clause(
    "Section I (Derivatives of the Model)",
    "distillation methods entailing the use of intermediate data representations or methods "
    "based on the generation of synthetic data by the Model for training the other model",
    quoted=True,
)


_RAIL_FLOW_DOWN = Clause(
    "paragraph 4.a",
    "Use-based restrictions as referenced in paragraph 5 MUST be included as an enforceable "
    "provision",
    quoted=True,
)


def _rail(
    id: str,
    name: str,
    url: str,
    aliases: tuple[str, ...],
    restricted: str,
    distillation: Clause,
    flow_down: Clause,
) -> Licence:
    """A licence of the RAIL family: a distilled student is a Derivative of the Model, use is
    free (commercial included) except for the uses in Attachment A, and those restrictions
    flow down to every derivative (paragraph 4.a)."""
    return Licence(
        id=id,
        name=name,
        url=url,
        aliases=aliases,
        outputs=OutputTerms(
            True,
            Clause(
                distillation.section,
                f"a student distilled from the Model is a Derivative of the Model "
                f"({distillation.text}), bound by the use-based restrictions",
            ),
        ),
        commercial=CommercialTerms(
            True,
            Clause(
                "Section II",
                "copyright and patent licences with no non-commercial limit, subject to the "
                "use-based restrictions",
            ),
        ),
        use_restrictions=(Clause("Attachment A", f"restricted uses include {restricted}"),),
        duties=(
            Duty(
                DutyKind.USE_RESTRICTIONS,
                "include the Attachment A use-based restrictions as an enforceable provision "
                "in the terms of the student, and tell its users they apply",
                flow_down,
            ),
            Duty(
                DutyKind.LICENCE_COPY,
                "give recipients of the student a copy of the licence",
                Clause("paragraph 4.b", "a copy of the licence goes to every recipient"),
            ),
            Duty(
                DutyKind.NOTICE,
                "keep the teacher's copyright and attribution notices, and mark modified files",
                Clause("paragraph 4.c-d", "modified files carry notices; notices are retained"),
            ),
        ),
    )


_RAIL_RESTRICTED = (
    "violating the law, harming minors, generating or spreading verifiably false information "
    "to harm others, defaming or harassing, fully automated decisions that adversely impact "
    "an individual's legal rights, discrimination, medical advice and medical results "
    "interpretation, and the administration of justice, law enforcement, immigration or "
    "asylum processes"
)

BIGSCIENCE_RAIL = _rail(
    "bigscience-bloom-rail-1.0",
    "BigScience RAIL License v1.0",
    "https://huggingface.co/spaces/bigscience/license",
    ("bigscience rail 1.0", "bloom rail"),
    _RAIL_RESTRICTED,
    _RAIL_DISTILLATION,
    _RAIL_FLOW_DOWN,
)
OPENRAIL_M = _rail(
    "bigscience-openrail-m",
    "BigScience OpenRAIL-M License",
    "https://www.licenses.ai/blog/2022/8/26/bigscience-open-rail-m-license",
    ("openrail-m", "bigscience openrail-m"),
    _RAIL_RESTRICTED,
    _RAIL_DISTILLATION,
    _RAIL_FLOW_DOWN,
)
DEEPSEEK = _rail(
    "deepseek",
    "DeepSeek License Agreement 1.0",
    "https://github.com/deepseek-ai/DeepSeek-LLM/blob/main/LICENSE-MODEL",
    ("deepseek license", "deepseek-license"),
    "military use, violating the law, harming minors, generating or spreading verifiably "
    "false information to harm others, discrimination, and fully automated decisions that "
    "adversely impact an individual's legal rights",
    Clause(
        "Section I (Derivatives of the Model)",
        "the definition includes models trained by distillation or on synthetic data the Model "
        "generates",
    ),
    Clause(
        "paragraph 4.a",
        "the Attachment A use restrictions must be an enforceable provision of any agreement "
        "under which the Model or its derivatives are used or distributed",
    ),
)
# DeepSeek-R1 and DeepSeek-V3-0324 are MIT licensed (their model cards say `license: mit`, and
# R1's explicitly allows distillation into other models), so they resolve to MIT above.

# --- Alibaba Qwen ------------------------------------------------------------------------------

# The Tongyi Qianwen text (Qwen, Qwen1.5, Qwen2-72B) is cited by section and quoted. The 2024
# Qwen and Qwen Research agreements (Qwen2.5-72B, Qwen2.5-3B) follow its shape; their clauses
# are paraphrased and cited by heading, since their numbering differs between releases.

_BUILT_WITH_QWEN = Duty(
    DutyKind.ATTRIBUTION,
    'display "Built with Qwen" or "Improved using Qwen" in the student\'s documentation',
    Clause(
        "Rules of use",
        "a model created, trained, fine-tuned or improved with the Materials or their outputs, "
        "and distributed or made available, displays the attribution in its documentation",
    ),
)


def _qwen_notice(model: str, agreement: str, section: str, quoted: bool) -> Duty:
    """The Notice file of the Qwen agreements; its wording is quoted only where the text is
    at hand (``quoted``)."""
    notice = f"{model} is licensed under the {agreement}, Copyright (c) Alibaba Cloud"
    if quoted:
        notice += ". All Rights Reserved."
        return Duty(
            DutyKind.NOTICE,
            f'ship the agreement and a "Notice" text file that reads: {notice}',
            Clause(section, notice, quoted=True),
        )
    return Duty(
        DutyKind.NOTICE,
        f'ship the agreement and a "Notice" text file stating that {notice}.',
        Clause(section, "the agreement and an attribution notice go with copies"),
    )


TONGYI_QIANWEN = Licence(
    id="tongyi-qianwen",
    name="Tongyi Qianwen License Agreement",
    url="https://github.com/QwenLM/Qwen/blob/main/Tongyi%20Qianwen%20LICENSE%20AGREEMENT",
    aliases=("tongyi qianwen license agreement",),
    outputs=OutputTerms(
        False,
        Clause(
            "§5.b",
            "You can not use the Materials or any output therefrom to improve any other large "
            "language model (excluding Tongyi Qianwen or derivative works thereof).",
            quoted=True,
        ),
        # §1.e: Tongyi Qianwen is Alibaba Cloud's large language models, Qwen and Qwen-Chat.
        only_families=("qwen", "qwen1", "qwen1.5", "qwen2", "tongyiqianwen"),
    ),
    commercial=CommercialTerms(
        True,
        Clause(
            "§2",
            "to use, reproduce, distribute, copy, create derivative works of, and make "
            "modifications to the Materials",
            quoted=True,
        ),
        max_monthly_active_users=100_000_000,
        users_clause=Clause(
            "§4",
            "If you are commercially using the Materials, and your product or service has more "
            "than 100 million monthly active users, You shall request a license from Us.",
            quoted=True,
        ),
        users_limit_commercial_only=True,
    ),
    use_restrictions=(
        Clause("§5.a", "use must comply with applicable laws, export controls included"),
    ),
    duties=(
        _qwen_notice("Tongyi Qianwen", "Tongyi Qianwen LICENSE AGREEMENT", "§3.c", quoted=True),
    ),
)

QWEN = Licence(
    id="qwen",
    name="Qwen License Agreement",
    url="https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE",
    aliases=("qwen license", "qwen license agreement"),
    outputs=OutputTerms(
        True,
        Clause(
            "Rules of use",
            "outputs may train other models, which then carry the Qwen attribution (the "
            "Tongyi Qianwen ban on improving other models is gone)",
        ),
    ),
    commercial=CommercialTerms(
        True,
        Clause(
            "Grant of Rights",
            "use, reproduction, modification and distribution, commercial included",
        ),
        max_monthly_active_users=100_000_000,
        users_clause=Clause(
            "Restrictions",
            "commercial use by a product or service with more than 100 million monthly active "
            "users needs a licence requested from Alibaba Cloud",
        ),
        users_limit_commercial_only=True,
    ),
    use_restrictions=(Clause("Rules of use", "use must comply with applicable laws"),),
    duties=(
        _BUILT_WITH_QWEN,
        _qwen_notice("Qwen", "Qwen LICENSE AGREEMENT", "Redistribution", quoted=False),
    ),
)

QWEN_RESEARCH = Licence(
    id="qwen-research",
    name="Qwen Research License Agreement",
    url="https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE",
    aliases=("qwen research license", "qwen research license agreement"),
    outputs=OutputTerms(
        True,
        Clause(
            "Rules of use",
            "outputs may train other models for non-commercial purposes, which then carry the "
            "Qwen attribution",
        ),
    ),
    commercial=CommercialTerms(
        False,
        Clause(
            "Definitions, Grant of Rights",
            "rights are granted for non-commercial (research or evaluation) purposes only; "
            "commercial use needs a separate licence from Alibaba Cloud",
        ),
    ),
    duties=(
        _BUILT_WITH_QWEN,
        _qwen_notice("Qwen", "Qwen RESEARCH LICENSE AGREEMENT", "Redistribution", quoted=False),
    ),
)

BUILT_IN: tuple[Licence, ...] = (
    APACHE_2,
    MIT,
    LLAMA_2,
    LLAMA_3,
    LLAMA_3_1,
    LLAMA_3_2,
    LLAMA_3_3,
    GEMMA,
    BIGSCIENCE_RAIL,
    OPENRAIL_M,
    QWEN,
    QWEN_RESEARCH,
    TONGYI_QIANWEN,
    DEEPSEEK,
)


class LicenceCatalogue:
    """Licences by id or alias, compared as :func:`normalise` spells them."""

    def __init__(self, licences: Iterable[Licence]) -> None:
        self._by_name: dict[str, Licence] = {}
        self._licences: dict[str, Licence] = {}
        for licence in licences:
            self._licences[licence.id] = licence  # a later entry with an id replaces it
        for licence in self._licences.values():
            for name in (licence.id, *licence.aliases):
                self._by_name[normalise(name)] = licence

    def get(self, name: str | None) -> Licence | None:
        """The licence ``name`` declares (an id or an alias), None if the catalogue lacks it."""
        return self._by_name.get(normalise(name)) if name else None

    def __iter__(self) -> Iterator[Licence]:
        return iter(self._licences.values())

    def __len__(self) -> int:
        return len(self._licences)

    def extended(self, licences: Iterable[Licence]) -> LicenceCatalogue:
        """This catalogue with ``licences`` added; an entry with a built-in id replaces it."""
        return LicenceCatalogue([*self._licences.values(), *licences])


CATALOGUE = LicenceCatalogue(BUILT_IN)


def load_catalogue(custom: Path | str | None = None) -> LicenceCatalogue:
    """The built-in catalogue, extended with the entries of a custom TOML or YAML file."""
    return CATALOGUE.extended(load_custom_licences(custom)) if custom else CATALOGUE


# --- custom entries ----------------------------------------------------------------------------


def load_custom_licences(path: Path | str) -> list[Licence]:
    """Licences from a TOML (``[[licence]]`` tables) or YAML (``licence:`` list) file, each
    shaped like :class:`Licence`: ``id``, ``name``, ``url``, ``outputs`` (``may_train``,
    ``clause``, ``only_families``), ``commercial`` (``allowed``, ``clause``,
    ``max_monthly_active_users``, ``users_clause``, ``users_limit_commercial_only``),
    ``use_restrictions`` (clauses), ``duties`` (``kind``, ``text``, ``clause``,
    ``name_prefix``), ``aliases``. A clause is ``{section, text, quoted}``."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
        document = (tomllib.loads(raw) if path.suffix == ".toml" else yaml.safe_load(raw)) or {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise InvalidArgument(f"{path}: cannot read licences ({type(error).__name__})") from None
    entries = (
        document.get("licence", document.get("licences")) if isinstance(document, dict) else None
    )
    if not isinstance(entries, list):
        raise InvalidArgument(f"{path}: expected a list of licences under the key 'licence'")
    return [_licence(entry, f"{path}: licence {i + 1}") for i, entry in enumerate(entries)]


def licence_from_json(text: str, where: str = "custom licence") -> Licence:
    """One custom licence from a JSON object shaped as :func:`load_custom_licences` describes
    (an admin's declaration of a licence the catalogue lacks)."""
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidArgument(f"{where}: not valid JSON", fields=("custom_json",)) from None
    return _licence(value, where)


def licence_to_json(licence: Licence) -> dict[str, Any]:
    """A licence as the JSON object :func:`licence_from_json` reads (TeacherInfo.license_json,
    the persisted declarations, provenance)."""
    record = asdict(licence)
    record["aliases"] = list(licence.aliases)
    return record


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{where}: expected a table")
    return value


def _build(cls: type, value: Any, where: str, convert: Mapping[str, Any] | None = None) -> Any:
    """``cls`` from a table whose keys are its fields; unknown or missing keys name ``where``."""
    table = dict(_mapping(value, where))
    names = {f.name for f in fields(cls)}
    if unknown := set(table) - names:
        raise InvalidArgument(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    for key, make in (convert or {}).items():
        if table.get(key) is not None:  # None: an optional part left out (users_clause)
            table[key] = make(table[key], f"{where}.{key}")
    try:
        return cls(**table)
    except TypeError as error:
        raise InvalidArgument(f"{where}: {error}") from None


def _clause(value: Any, where: str) -> Clause:
    clause: Clause = _build(Clause, value, where)
    if not isinstance(clause.section, str) or not isinstance(clause.text, str):
        raise InvalidArgument(f"{where}: a clause has a section and a text")
    return clause


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{where}: expected a list of strings")
    return tuple(value)


def _clauses(value: Any, where: str) -> tuple[Clause, ...]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}: expected a list of clauses")
    return tuple(_clause(v, f"{where}[{i}]") for i, v in enumerate(value))


def _duty(value: Any, where: str) -> Duty:
    def kind(v: Any, w: str) -> DutyKind:
        try:
            return DutyKind(v)
        except ValueError:
            raise InvalidArgument(f"{w}: one of {', '.join(k.value for k in DutyKind)}") from None

    duty: Duty = _build(Duty, value, where, {"kind": kind, "clause": _clause})
    return duty


def _licence(value: Any, where: str) -> Licence:
    def duties(v: Any, w: str) -> tuple[Duty, ...]:
        if not isinstance(v, list):
            raise InvalidArgument(f"{w}: expected a list of duties")
        return tuple(_duty(d, f"{w}[{i}]") for i, d in enumerate(v))

    def outputs(v: Any, w: str) -> OutputTerms:
        terms: OutputTerms = _build(
            OutputTerms, v, w, {"clause": _clause, "only_families": _strings}
        )
        return terms

    def commercial(v: Any, w: str) -> CommercialTerms:
        terms: CommercialTerms = _build(
            CommercialTerms, v, w, {"clause": _clause, "users_clause": _clause}
        )
        return terms

    licence: Licence = _build(
        Licence,
        value,
        where,
        {
            "outputs": outputs,
            "commercial": commercial,
            "use_restrictions": _clauses,
            "duties": duties,
            "aliases": _strings,
        },
    )
    if not isinstance(licence.id, str) or not normalise(licence.id):
        raise InvalidArgument(f"{where}: a licence needs an id")
    return licence


# --- model cards -------------------------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)^---[ \t]*\r?$", re.DOTALL | re.MULTILINE)


def model_card_licence(readme: str) -> str | None:
    """The licence a model card declares in its YAML front matter: ``license:`` (the first, if a
    list), or ``license_name:`` where ``license: other``. None when the card declares none or
    its front matter is not YAML."""
    match = _FRONT_MATTER.match(readme)
    if match is None:
        return None
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    if not isinstance(meta, dict):
        return None
    declared = meta.get("license")
    if isinstance(declared, list):
        declared = declared[0] if declared else None
    if isinstance(declared, str) and declared.strip().lower() == "other":
        declared = meta.get("license_name")
    return declared.strip() if isinstance(declared, str) and declared.strip() else None


def model_card_licence_of(model_dir: Path | str) -> str | None:
    """:func:`model_card_licence` of a model directory's README.md, None without one."""
    try:
        readme = (Path(model_dir) / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return model_card_licence(readme)
