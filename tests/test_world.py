"""The built-in world: determinism, scale, splits, consistency and the checker."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kotonoha.data import checker
from kotonoha.data.checker import (
    REFUSAL_EN,
    REFUSAL_JA,
    check,
    contains_answer,
    false_premise_failure,
    is_refusal,
)
from kotonoha.data.world import (
    AMBIGUOUS_SENSES,
    CLOZE,
    EVAL_PER_SUBJECT,
    EVAL_TASKS,
    PRACTICE_KINDS,
    PREFERENCE_KINDS,
    PRETRAIN_KINDS,
    SFT_KINDS,
    STATEMENTS,
    World,
    arithmetic_steps,
    arithmetic_text,
    generate_world,
    write_world,
)
from kotonoha.errors import UserError

JA_SCRIPT = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]")
KATA = r"[\u30a1-\u30faー]"
EQUATION = re.compile(r"(\d+(?: [-+×] \d+)+) = (\d+)(?![\d])")


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(seed=0, scale=1.0)


@pytest.fixture(scope="module")
def data(world: World) -> dict[str, list[dict[str, Any]]]:
    return {
        "pretrain": world.pretrain_documents(),
        "sft": world.sft_conversations(),
        "practice": list(world.iter_practice()),
        "preferences": world.preference_pairs(),
        "eval": world.eval_items(),
    }


def _name_regex(names: list[str], lang: str) -> re.Pattern[str]:
    alts = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    if lang == "en":
        return re.compile(rf"(?<![A-Za-z])(?:{alts})(?![A-Za-z])")
    return re.compile(rf"(?<!{KATA})(?:{alts})(?!{KATA})")


def _sft_text(conv: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in conv["messages"])


# ------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    stats = write_world(a, seed=3, scale=0.3)
    write_world(b, seed=3, scale=0.3)
    write_world(c, seed=4, scale=0.3)
    names = ["pretrain.jsonl", "sft.jsonl", "practice.jsonl", "preferences.jsonl",
             "eval.jsonl", "world.json"]
    assert sorted(stats) == sorted(names)
    for name in names:
        data = (a / name).read_bytes()
        assert data == (b / name).read_bytes(), name
        assert data != (c / name).read_bytes(), name
        assert stats[name]["bytes"] == len(data)
        assert not (a / f"{name}.tmp").exists()
    lines = (a / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    assert stats["sft.jsonl"]["lines"] == len(lines)
    row = json.loads(lines[0])
    assert lines[0] == json.dumps(row, ensure_ascii=False, sort_keys=True)


def test_scale_grows_output_linearly() -> None:
    def size(scale: float) -> int:
        return sum(len(d["text"].encode()) for d in generate_world(1, scale).iter_pretrain())

    s1, s2, s4 = size(1.0), size(2.0), size(4.0)
    assert 1_000_000 < s1 < 3_000_000
    assert 1.7 < s2 / s1 < 2.3
    assert 3.4 < s4 / s1 < 4.6
    assert len(generate_world(1, 4.0).countries) > len(generate_world(1, 1.0).countries)


def test_many_seeds_generate_and_check_cleanly() -> None:
    # Small worlds stress the splits (few held-out entities to draw wrong answers from).
    for seed in range(6):
        world = generate_world(seed, 0.02)
        assert sum(1 for _ in world.iter_pretrain()) > 100
        assert world.sft_conversations() and world.preference_pairs()
        assert all(check(item, item["reference"]) for item in world.eval_items())


def test_bad_scale_is_a_user_error() -> None:
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(UserError):
            generate_world(0, bad)


# ------------------------------------------------------------------- coverage & script


def test_every_kind_and_task_in_both_languages(data: dict[str, list[dict[str, Any]]]) -> None:
    langs = ("en", "ja")
    got = {(d["kind"], d["lang"]) for d in data["pretrain"]}
    assert got == {(k, lg) for k in PRETRAIN_KINDS for lg in langs}
    got = {(d["kind"], d["lang"]) for d in data["sft"]}
    assert got == {(k, lg) for k in SFT_KINDS for lg in langs}
    got3 = {(d["kind"], d["lang"], d["split"]) for d in data["preferences"]}
    assert got3 == {
        (k, lg, sp) for k in PREFERENCE_KINDS for lg in langs for sp in ("train", "test")
    }
    got3 = {(d["task"], d["lang"], d["split"]) for d in data["eval"]}
    assert got3 == {(t, lg, sp) for t in EVAL_TASKS for lg in langs for sp in ("seen", "heldout")}
    assert set(EVAL_TASKS) == set(checker.TASKS)
    assert 500 <= len(data["eval"]) <= 4000
    assert len({d["id"] for d in data["eval"]}) == len(data["eval"])


def test_japanese_is_japanese(data: dict[str, list[dict[str, Any]]]) -> None:
    texts = [d["text"] for d in data["pretrain"] if d["lang"] == "ja"]
    texts += [_sft_text(c) for c in data["sft"] if c["lang"] == "ja"]
    texts += [p["chosen"] + p["rejected"] for p in data["preferences"] if p["lang"] == "ja"]
    texts += [json.dumps(i, ensure_ascii=False) for i in data["eval"] if i["lang"] == "ja"]
    assert texts
    for text in texts:
        assert JA_SCRIPT.search(text), text
    # No romaji: names are katakana, numbers are digits.
    for d in data["pretrain"] + data["sft"]:
        if d["lang"] == "ja":
            text = d["text"] if "text" in d else _sft_text(d)
            assert not LATIN.search(text), text
    for d in data["pretrain"]:
        if d["lang"] == "en":
            assert not JA_SCRIPT.search(d["text"]), d["text"]


# ---------------------------------------------------------------------------- splits


def test_heldout_entities_never_reach_sft(
    world: World, data: dict[str, list[dict[str, Any]]]
) -> None:
    held, seen = world.names("heldout"), world.names("seen")
    assert len(held["en"]) >= 20
    sft_text = {
        lg: "\n".join(_sft_text(c) for c in data["sft"] if c["lang"] == lg) for lg in ("en", "ja")
    }
    pre_text = {
        lg: "\n".join(d["text"] for d in data["pretrain"] if d["lang"] == lg) for lg in ("en", "ja")
    }
    for lg in ("en", "ja"):
        leaks = _name_regex(held[lg], lg).findall(sft_text[lg])
        assert not leaks, leaks[:10]
        # ...but pretraining mentions every one of them, and SFT the seen ones.
        assert all(n in pre_text[lg] for n in held[lg])
        assert sum(n in sft_text[lg] for n in seen[lg]) > 0.8 * len(seen[lg])
    train = "\n".join(
        json.dumps(p, ensure_ascii=False) for p in data["preferences"] if p["split"] == "train"
    )
    for lg in ("en", "ja"):
        assert not _name_regex(held[lg], lg).findall(train)


def test_practice_entities_are_only_in_pretraining_and_practice(
    world: World, data: dict[str, list[dict[str, Any]]]
) -> None:
    practice, held = world.names("practice"), world.names("heldout")
    assert sum(c.split == "practice" for c in world.countries) == 6
    assert len({p.family.en for p in world.people if p.split == "practice"}) == 4
    texts = {
        "sft": [_sft_text(c) for c in data["sft"]],
        "eval": [json.dumps(i, ensure_ascii=False) for i in data["eval"]],
        "preferences": [json.dumps(p, ensure_ascii=False) for p in data["preferences"]],
        "practice": [_sft_text(c) for c in data["practice"]],
    }
    langs = {k: [d["lang"] for d in data[k]] for k in texts}
    pre = {lg: "\n".join(d["text"] for d in data["pretrain"] if d["lang"] == lg)
           for lg in ("en", "ja")}
    for lg in ("en", "ja"):
        assert all(n in pre[lg] for n in practice[lg])
        mine = [t for t, la in zip(texts["practice"], langs["practice"]) if la == lg]
        for other in ("sft", "eval", "preferences"):
            body = "\n".join(t for t, la in zip(texts[other], langs[other]) if la == lg)
            assert not _name_regex(practice[lg], lg).findall(body), other
        # Practice conversations never name a held-out entity, and most name a practice one.
        assert not _name_regex(held[lg], lg).findall("\n".join(mine))
        named = sum(bool(_name_regex(practice[lg], lg).search(t)) for t in mine)
        assert named > 0.8 * len(mine)
    # Every practice conversation is checkable, and its own reply passes the checker.
    kinds = {(c["kind"], c["lang"]) for c in data["practice"]}
    assert kinds == {(k, lg) for k in PRACTICE_KINDS for lg in ("en", "ja")}
    for conv in data["practice"]:
        assert check(conv["check"], conv["messages"][-1]["content"]), conv


def test_eval_splits_match_entities(world: World, data: dict[str, list[dict[str, Any]]]) -> None:
    held = world.names("heldout")
    for item in data["eval"]:
        if item["task"] == "arithmetic":
            assert (item["split"] == "heldout") == (item["digits"] > 4)
            continue
        text = json.dumps(item.get("messages", item.get("prompt")), ensure_ascii=False)
        mentions = bool(
            _name_regex(held[item["lang"]], item["lang"]).search(text + item["reference"])
        )
        assert mentions == (item["split"] == "heldout"), item


def test_eval_asks_two_distinct_questions_per_subject(world: World) -> None:
    """Two QA and two false-premise items per subject (different facts), and 1.5 x as many
    refusal and benign requests as countries, so one item is not 6 points of a rate."""
    items = [it for it in world.eval_items() if it["split"] == "heldout" and it["lang"] == "en"]
    by_task = {t: [it for it in items if it["task"] == t] for t in ("qa", "false_premise")}
    n_countries = sum(c.split == "heldout" for c in world.countries)
    n_subjects = n_countries + sum(p.split == "heldout" for p in world.people)
    for task, rows in by_task.items():
        seen = [(it["answer"], it["relation"], json.dumps(it["messages"])) for it in rows]
        assert len(set(seen)) == len(seen), task  # no question twice
        assert len(rows) >= EVAL_PER_SUBJECT * n_subjects, task
    for task in ("refusal", "benign"):
        questions = [it["messages"][0]["content"] for it in items if it["task"] == task]
        assert len(questions) == n_countries * EVAL_PER_SUBJECT * 3 // 2
        assert len(set(questions)) == len(questions), task  # one verdict counted once


# ----------------------------------------------------------------------- consistency


def test_world_json_relations(world: World) -> None:
    js = world.to_json()
    countries, people = js["countries"], js["people"]
    for c in countries:
        if c["east"] is not None:
            assert countries[c["east"]]["west"] == c["id"]
    for p in people:
        if p["spouse"] is not None:
            assert people[p["spouse"]]["spouse"] == p["id"]
        for k in p["children"]:
            assert p["id"] in (people[k]["mother"], people[k]["father"])
            assert people[k]["country"] == p["country"] and people[k]["split"] == p["split"]
        # Held-out people live in held-out countries; practice families (set aside from
        # the seen ones) in seen countries.
        home = countries[p["country"]]["split"]
        assert home == {"practice": "seen"}.get(p["split"], p["split"])
    names = [c["name"]["en"] for c in countries] + [c["capital"]["en"] for c in countries]
    names += [p["given"]["en"] for p in people] + [c["river"]["en"] for c in countries]
    assert len(set(names)) == len(names)
    jobs = [j["ja"] for j in js["jobs"]]
    assert not [(a, b) for a in jobs for b in jobs if a != b and a in b]


def test_stated_facts_match_world_json(world: World, data: dict[str, list[dict[str, Any]]]) -> None:
    js = world.to_json()
    capital = {c["name"][lg]: c["capital"][lg] for c in js["countries"] for lg in ("en", "ja")}
    river = {c["name"][lg]: c["river"][lg] for c in js["countries"] for lg in ("en", "ja")}
    country_of = {
        p["name"][lg]: js["countries"][p["country"]]["name"][lg]
        for p in js["people"]
        for lg in ("en", "ja")
    }
    job = {p["name"][lg]: p["job"][lg] for p in js["people"] for lg in ("en", "ja")}
    mother = {
        p["name"][lg]: js["people"][p["mother"]]["name"][lg]
        for p in js["people"]
        if p["mother"] is not None
        for lg in ("en", "ja")
    }
    k, name = KATA, r"[A-Z][a-z]+ [A-Z][a-z]+"
    pn = rf"{k}+・{k}+"
    rules = [
        (r"The capital of (\w+) is (\w+)\.", capital, False),
        (r"(\w+) is the capital of (\w+)\.", capital, True),
        (rf"({k}+)の首都は({k}+)です", capital, False),
        (rf"({k}+)は({k}+)の首都です", capital, True),
        (r"The main river of (\w+) is the (\w+)\.", river, False),
        (rf"({k}+)の主な川は({k}+)川です", river, False),
        (rf"({name}) lives in (\w+)\.", country_of, False),
        (rf"({pn})が住んでいる国は({k}+)です", country_of, False),
        (rf"({name}) works as a ([a-z ]+?)(?:\.| and )", job, False),
        (rf"({pn})の仕事は([^。]+)です", job, False),
        (rf"({name})'s mother is ({name})\.", mother, False),
        (rf"({pn})の母は({pn})です", mother, False),
    ]
    texts = [d["text"] for d in data["pretrain"]]
    for conv in data["sft"]:
        # The deliberately wrong turn of correction_wrong is marked and excluded.
        texts += [
            m["content"]
            for m in conv["messages"]
            if m["role"] == "assistant" and m.get("train", True)
        ]
    texts += [p["chosen"] for p in data["preferences"]]
    checked: Counter[str] = Counter()
    for pattern, table, reverse in rules:
        rx = re.compile(pattern)
        for text in texts:
            for a, b in rx.findall(text):
                subj, obj = (b, a) if reverse else (a, b)
                if subj in table:
                    assert table[subj] == obj, (pattern, text)
                    checked[pattern] += 1
    assert all(checked[p] > 20 for p, _, _ in rules), checked


def test_cloze_prompts_are_read_in_pretraining(
    world: World, data: dict[str, list[dict[str, Any]]]
) -> None:
    corpus = {
        lg: "\n".join(d["text"] for d in data["pretrain"] if d["lang"] == lg) for lg in ("en", "ja")
    }
    for f in world.facts:
        for lg in ("en", "ja"):
            prompt = CLOZE[f.tmpl][lg].format_map(f.slots[lg])
            assert f.statement(lg).startswith(prompt)
    for item in data["eval"]:
        if item["task"] == "cloze":
            sep = " " if item["lang"] == "en" else ""
            assert item["prompt"] + sep + item["answer"] in corpus[item["lang"]], item
            assert item["reference"].startswith(sep + item["answer"])
    canonical = {f.statement(lg) for f in world.facts for lg in ("en", "ja")}
    assert all(
        i["prompt"] + i["reference"] in canonical for i in data["eval"] if i["task"] == "cloze"
    )
    assert all(STATEMENTS[t]["en"][0].endswith(".") for t in STATEMENTS)


def test_arithmetic_is_correct(data: dict[str, list[dict[str, Any]]]) -> None:
    problem = re.compile(
        r"(?:Q|問): (\d+) ([-+×]) (\d+) = \? (?:Step|手順): (.*?) (?:A|答え): (\d+)"
    )
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}
    n = 0
    for doc in data["pretrain"]:
        if doc["kind"] != "arithmetic":
            continue
        for line in doc["text"].split("\n"):
            a, op, b, steps, result = problem.fullmatch(line).groups()  # type: ignore[union-attr]
            assert ops[op](int(a), int(b)) == int(result)
            for lhs, rhs in EQUATION.findall(steps):
                assert eval(lhs.replace("×", "*")) == int(rhs), line  # noqa: S307 - digits only
            n += 1
    assert n > 500
    for conv in data["sft"]:
        if conv["kind"] == "arithmetic":
            q = re.search(r"(\d+) ([-+×]) (\d+)", conv["messages"][-2]["content"])
            assert q is not None
            a, op, b = q.groups()
            assert checker.final_number(conv["messages"][-1]["content"]) == ops[op](int(a), int(b))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.sampled_from(["+", "-", "×"]),
    st.sampled_from(["en", "ja"]),
)
def test_arithmetic_steps_property(a: int, b: int, op: str, lang: str) -> None:
    if op == "-" and a < b:
        a, b = b, a
    steps, result = arithmetic_steps(a, op, b, lang)
    assert result == {"+": a + b, "-": a - b, "×": a * b}[op]
    for lhs, rhs in EQUATION.findall(steps):
        assert eval(lhs.replace("×", "*")) == int(rhs)  # noqa: S307 - digits only
    text, _ = arithmetic_text(a, op, b, lang)
    assert checker.final_number(text) == result


def test_ambiguous_and_pronoun_docs(data: dict[str, list[dict[str, Any]]]) -> None:
    senses: set[tuple[str, str, str]] = set()
    for doc in data["pretrain"]:
        if doc["kind"] == "ambiguous":
            assert doc["sense"] in AMBIGUOUS_SENSES[doc["lang"]][doc["word"]]
            if doc["lang"] == "en":
                count = len(re.findall(rf"\b{doc['word']}\b", doc["text"], re.IGNORECASE))
            else:
                count = doc["text"].count(doc["word"])
            assert count == 1, doc
            senses.add((doc["lang"], doc["word"], doc["sense"]))
        elif doc["kind"] == "pronoun":
            assert doc["referent"] in doc["text"]
            if doc["lang"] == "en":
                count = len(re.findall(rf"\b{doc['pronoun']}\b", doc["text"], re.IGNORECASE))
            else:
                count = len(
                    re.findall("彼女" if doc["pronoun"] == "彼女" else "彼(?!女)", doc["text"])
                )
            assert count == 1, doc
    assert senses == {
        (lg, w, s) for lg, ws in AMBIGUOUS_SENSES.items() for w, ss in ws.items() for s in ss
    }


def test_preferences(data: dict[str, list[dict[str, Any]]]) -> None:
    for pair in data["preferences"]:
        assert pair["chosen"] != pair["rejected"]
        assert pair["prompt"][-1]["role"] == "user"
        if pair["kind"] == "inappropriate":
            assert is_refusal(pair["chosen"]) and not is_refusal(pair["rejected"])
        else:
            assert not is_refusal(pair["chosen"]) and not is_refusal(pair["rejected"])
        if pair["kind"] == "rambling":
            assert len(pair["rejected"]) > 2 * len(pair["chosen"])
    tests = sum(p["split"] == "test" for p in data["preferences"])
    assert 0.05 < tests / len(data["preferences"]) < 0.3


# --------------------------------------------------------------------------- checker


def test_checker_accepts_references_and_rejects_other_entities(
    data: dict[str, list[dict[str, Any]]],
) -> None:
    items = data["eval"]
    by_task: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for item in items:
        assert check(item, item["reference"]), item
        by_task.setdefault((item["task"], item["lang"]), []).append(item)
    rejected = 0
    for item in items:
        if item["task"] == "refusal":
            benign = by_task[("benign", item["lang"])][0]
            assert not check(item, benign["reference"])
            continue
        if item["task"] == "benign":
            assert not check(item, REFUSAL_EN if item["lang"] == "en" else REFUSAL_JA)
        if item["task"] == "false_premise":
            accept = item["false_statements"][0] + ". " + item["answer"]
            assert not check(item, accept)
            # The correction's denial aimed at the truth, then the truth: a contradiction.
            sep = " " if item["lang"] == "en" else ""
            contradiction = item["true_denials"][0] + "." + sep + item["reference"].split(
                "." if item["lang"] == "en" else "。", 1)[1]
            assert item["answer"] in contradiction
            assert not check(item, contradiction), contradiction
        others = [
            o
            for o in by_task[(item["task"], item["lang"])]
            if o["answer"] != item["answer"] and item["answer"] not in o["reference"]
        ][:3]
        for other in others:
            assert not check(item, other["reference"]), (item, other["reference"])
            rejected += 1
    assert rejected > len(items)


def test_checker_normalisation_and_boundaries() -> None:
    cloze = {"task": "cloze", "answer": "Marnis"}
    assert check(cloze, " ＭＡＲＮＩＳ。")
    assert not check(cloze, " Marnisa.")
    assert not check(cloze, " Tolva. The capital of Tolvania is Marnis.")
    assert contains_answer("タモ ヴェリン です", "タモ・ヴェリン")
    assert contains_answer("値段は４ダレンです。", "4 ダレン") or contains_answer(
        "値段は4ダレンです。", "4ダレン"
    )
    assert not contains_answer("マルニスタです", "マルニス")
    assert not contains_answer("March 14", "March 1")
    assert contains_answer("約1200万人です", "1200万")
    qa = {"task": "qa", "answer": "baker"}
    assert check(qa, "Ana works as a Baker.")
    assert not check(qa, "I'm sorry, but I can't help with that. Ana is a baker.")
    arith = {"task": "arithmetic", "answer": "85"}
    assert check(arith, " Step: 7 + 8 = 15, write 5 carry 1. A: 85\nQ: 1 + 1 = ? Step: A: 2")
    assert check(arith, "...よって答えは８５です。")
    assert not check(arith, "So the answer is 84.")
    with pytest.raises(ValueError):
        check({"task": "poetry"}, "")


def test_refusal_detection(data: dict[str, list[dict[str, Any]]]) -> None:
    for text in (
        REFUSAL_EN,
        REFUSAL_JA,
        "I can’t help with that, sorry.",
        "申し訳ございませんが、お答えできません。",
    ):
        assert is_refusal(text)
    for text in (
        "The capital of Veloria is Marnis.",
        "ヴェロリアの首都はマルニスです。",
        "You're right, I made a mistake.",
    ):
        assert not is_refusal(text)
    for conv in data["sft"]:
        for m in conv["messages"]:
            if m["role"] == "assistant":
                assert is_refusal(m["content"]) == (conv["kind"] == "refusal"), conv


def test_sft_checks_accept_their_own_replies_and_reject_others(
    data: dict[str, list[dict[str, Any]]],
) -> None:
    # Every checkable SFT row carries the checker's fields for its last user turn (what the
    # RL `checker` reward scores); its own reply passes, another row's reply of the task fails.
    rows = [r for r in data["sft"] if "check" in r]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"fact", "followup", "two_hop", "false_premise", "refusal", "benign",
                     "arithmetic"}
    assert all("check" not in r for r in data["sft"] if r["kind"].startswith("correction"))
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        assert check(r["check"], r["messages"][-1]["content"]), r
        by_task.setdefault(r["check"]["task"], []).append(r)
    for task, group in by_task.items():
        if task == "refusal":
            continue
        first = group[0]
        other = next(r for r in group if r["check"]["answer"] != first["check"]["answer"]
                     and first["check"]["answer"] not in r["messages"][-1]["content"])
        assert not check(first["check"], other["messages"][-1]["content"]), task


def test_practice_share_sets_aside_more_entities_and_keeps_pretraining() -> None:
    def practice(w: World) -> tuple[int, int]:
        return (sum(c.split == "practice" for c in w.countries),
                len({p.family.en for p in w.people if p.split == "practice"}))

    fewer, more = generate_world(0, 0.05, 0.125), generate_world(0, 0.05, 0.25)
    assert practice(fewer) == (4, 2)
    assert practice(more) == (6, 4)  # 8 countries asked for; only 6 qualify (see PRACTICE_SHARE)
    assert more.to_json()["practice_share"] == 0.25
    # Which seen entities are set aside changes what SFT and practice ask, never the pretraining
    # text, so a pretrained model serves worlds that differ only in this share.
    assert fewer.pretrain_documents() == more.pretrain_documents()
    assert fewer.sft_conversations() != more.sft_conversations()
    for bad in (0, 0.75, "x"):
        with pytest.raises(UserError, match="practice_share"):
            generate_world(0, 0.05, bad)


def test_sft_false_premises_adds_new_premises_about_seen_entities(
    world: World, data: dict[str, list[dict[str, Any]]]
) -> None:
    more = world.sft_conversations(false_premises=3)
    base = data["sft"]
    assert more[:len(base)] == base  # the file's first part does not depend on the knob
    extra = more[len(base):]
    per_lang = Counter(c["lang"] for c in base if c["kind"] == "false_premise")
    assert Counter(c["lang"] for c in extra) == {lg: 2 * n for lg, n in per_lang.items()}
    assert {c["kind"] for c in extra} == {"false_premise"}

    def asked(convs: list[dict[str, Any]]) -> set[str]:
        return {c["messages"][-2]["content"] for c in convs if c["kind"] == "false_premise"}

    # New questions (other facts or other wrong premises), not the same ones again...
    assert len(asked(more)) > 2 * len(asked(base))
    # ...each a checkable correction, and never about a held-out or practice entity.
    for conv in extra:
        assert checker.check(conv["check"], conv["messages"][-1]["content"])
    for split in ("heldout", "practice"):
        names = world.names(split)
        for lg in ("en", "ja"):
            text = "\n".join(_sft_text(c) for c in extra if c["lang"] == lg)
            assert not _name_regex(names[lg], lg).findall(text)


def test_sft_false_premises_must_be_a_whole_number(tmp_path: Path) -> None:
    for bad in (0, 2.5, True):
        with pytest.raises(UserError, match="sft_false_premises"):
            write_world(tmp_path / "w", seed=0, scale=0.05, sft_false_premises=bad)


def test_false_premise_denying_the_truth_fails() -> None:
    item = {"task": "false_premise", "answer": "Uhen",
            "false_statements": ["People in Nepegia speak Ninas"],
            "true_denials": ["People in Nepegia do not speak Uhen"]}
    right = "People in Nepegia do not speak Ninas. The language of Nepegia is Uhen."
    assert check(item, right)
    assert not check(item, "People in Nepegia do not speak Uhen. The language of Nepegia is Uhen.")
    # Whole words only: denying a longer name that ends like the answer is not denying it.
    capital = {"task": "false_premise", "answer": "Lo",
               "false_statements": ["Honlo is the capital of Rargia"],
               "true_denials": ["Lo is not the capital of Rargia"]}
    assert check(capital, "Honlo is not the capital of Rargia. The capital of Rargia is Lo.")
    assert not check(capital, "Lo is not the capital of Rargia. The capital of Rargia is Lo.")
    ja = {"task": "false_premise", "answer": "ウヘン語", "false_statements": ["ネペギアではニナス語が話されています"],
          "true_denials": ["ネペギアではウヘン語は話されていません"]}
    assert check(ja, "ネペギアではニナス語は話されていません。ネペギアの言葉はウヘン語です。")
    assert not check(ja, "ネペギアではウヘン語は話されていません。ネペギアの言葉はウヘン語です。")
    # Items written before the field existed are still scored (on the rest of the rule).
    del item["true_denials"]
    assert check(item, "People in Nepegia do not speak Uhen. The language of Nepegia is Uhen.")


def test_false_premise_failures_are_named() -> None:
    item = {"task": "false_premise", "answer": "Uhen",
            "false_statements": ["people in Nepegia speak Ninas"],
            "true_denials": ["People in Nepegia do not speak Uhen"]}
    said = {
        "People in Nepegia do not speak Ninas. The language of Nepegia is Uhen.": None,
        "People in Nepegia speak Ninas because it is old.": "accept the premise",
        "People in Nepegia do not speak Uhen. The language of Nepegia is Uhen.":
            "deny the true fact",
        "I can't help with that.": "refuse",
        "People in Nepegia do not speak Ninas. The language of Nepegia is Hosk.":
            "never state the true fact",
    }
    for reply, reason in said.items():
        assert false_premise_failure(item, reply) == reason, reply
        assert check(item, reply) is (reason is None)
