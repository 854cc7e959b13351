"""The report card's targets table: pass/miss, the reason for a miss, and chance."""

from kotonoha.eval.chat import sign_test
from kotonoha.report import (
    copied_share,
    false_premise_misses,
    language_table,
    other_entity_count,
    stage_notes,
    targets,
    timing_table,
)


def _win(wins: int, losses: int, ties: int) -> dict:
    n = wins + losses + ties
    return {"against": "sft", "wins": wins, "losses": losses, "ties": ties, "n": n,
            "win_rate": (wins + ties / 2) / n, "p_value": sign_test(wins, losses)}


def test_win_rate_targets_say_when_they_are_chance_and_why_they_missed() -> None:
    sft = {"qa": 0.9, "false_premise": 0.85, "refusal": 1.0, "over_refusal": 0.0}
    data = {"evals": {"sft": {"split": "default", "rates": sft}},
            "wins": {"rl": _win(15, 28, 515), "dpo": _win(37, 9, 512)}}
    rows = {t["target"].split(" ")[0]: t for t in targets(data)}
    rl, dpo = rows["RL"], rows["DPO"]
    assert not rl["pass"] and dpo["pass"]
    # 43 changed verdicts of 558: not "barely changes"; p = 0.066 is within chance.
    assert "within chance (sign test p=0.066)" in rl["why"]
    assert "at least as many went the wrong way" in rl["why"]
    assert dpo["why"] == ""  # p = 4e-5: a real win needs no note
    data["wins"]["rl"] = _win(2, 4, 323)
    rl = next(t for t in targets(data) if t["target"].startswith("RL"))
    assert "barely changes" in rl["why"] and "within chance" in rl["why"]
    assert all(t["pass"] for t in targets(data) if t["target"].startswith("SFT"))


def test_copied_sft_replies_are_counted_and_explain_a_qa_miss() -> None:
    training = {"Kavis Gafok works as a florist.", "The capital of Emafia is Ruk."}
    items = [
        {"task": "qa", "lang": "en", "response": "Kavis Gafok works as a florist. "},  # copied
        {"task": "qa", "lang": "en", "response": "Ebos Pezar works as a baker."},
        {"task": "followup", "lang": "ja", "response": "The capital of Emafia is Ruk."},
        {"task": "two_hop", "lang": "en", "response": "Emafia."},
        # a refusal may be a training reply word for word and still be right: not counted
        {"task": "refusal", "lang": "en", "response": "The capital of Emafia is Ruk."},
    ]
    assert copied_share(items, training) == 0.5
    assert copied_share(items[4:], training) is None
    sft = {"qa": 0.75, "qa_seen": 0.98, "false_premise": 0.85, "refusal": 1.0,
           "over_refusal": 0.0}
    data = {"evals": {"sft": {"split": "default", "rates": sft, "tasks": {}}},
            "wins": {}, "copied": {"sft": 0.5}}
    qa = next(t for t in targets(data) if "QA" in t["target"])
    assert not qa["pass"] and "50% of its replies about held-out entities repeat" in qa["why"]
    headers, rows = language_table(data)
    assert headers[-1] == "copied SFT replies" and rows[0][-1] == "50.0%"


def test_wrong_answers_about_another_entity_are_told_from_wrong_facts() -> None:
    names = ["Nepegia", "ネペギア", "Emafia", "エマフィア", "Merlo Darok", "メルロ・ダロク"]

    def item(i: str, question: str, split: str = "heldout", task: str = "qa") -> dict:
        return {"id": i, "task": task, "split": split,
                "messages": [{"role": "user", "content": question}]}

    world = {w["id"]: w for w in [
        item("a", "ネペギアの首都を教えてください。"), item("b", "What does Merlo Darok do?"),
        item("c", "Which country lies to the east of Nepegia?"), item("d", "What is 3 + 1?"),
        item("e", "What is the capital of Emafia?", split="seen"),
        item("f", "Where is Nepegia?", task="followup")]}
    replies = [
        {"id": "a", "task": "qa", "correct": False, "response": "エマフィアの首都はルクです。"},
        {"id": "b", "task": "qa", "correct": False, "response": "Merlo Hosrar is a baker."},
        {"id": "c", "task": "qa", "correct": False, "response": "To the west of nepegia lies X."},
        {"id": "d", "task": "qa", "correct": False, "response": "7"},  # names no entity
        {"id": "e", "task": "qa", "correct": False, "response": "Ruk."},  # seen: not counted
        {"id": "f", "task": "followup", "correct": False, "response": "Emafia."},
    ]
    # a: another country; b: another person; c: the right country (as the checker matches
    # names: case folded), a wrong relation.
    assert other_entity_count(replies, world, names) == {"wrong": 3, "other_entity": 2}
    right = [dict(r, correct=True) for r in replies]
    assert other_entity_count(right, world, names) is None
    sft = {"qa": 0.75, "qa_seen": 0.98, "false_premise": 0.85, "refusal": 1.0,
           "over_refusal": 0.0}
    data = {"evals": {"sft": {"split": "default", "rates": sft, "tasks": {}}}, "wins": {},
            "other_entity": {"sft": {"wrong": 3, "other_entity": 2}}}
    qa = next(t for t in targets(data) if "QA" in t["target"])
    assert "2 of its 3 wrong held-out QA replies are about another entity" in qa["why"]


def test_the_dpo_note_says_which_mistakes_it_learned_from() -> None:
    before = {"val_logp_accuracy": 0.9, "val_logp_margin": 1.0}
    after = {"val_logp_accuracy": 1.0, "val_logp_margin": 2.0}
    dpo = {"beta": 0.1, "before": before, "after": after,
           "mistakes": {"asked": 800, "wrong": 153, "file": "world", "samples": 0}}
    note = next(n for n in stage_notes({"dpo": dpo}) if n.startswith("DPO"))
    assert "153 wrong greedy replies to 800 practice questions" in note
    dpo["mistakes"] |= {"wrong": 1247, "samples": 4}
    note = next(n for n in stage_notes({"dpo": dpo}) if n.startswith("DPO"))
    assert "1247 wrong replies (greedy, and 4 sampled per question) to 800" in note


def test_timing_table_leaves_out_the_report_itself() -> None:
    """The report's DONE.json is written after the report: its row would be the last run's."""
    stages = {"pretrain": {"seconds": 200.0, "finished_at": "t1"},
              "eval": {"seconds": 30.0, "finished_at": "t2"},
              "report": {"seconds": 1.0, "finished_at": "t0"}}
    _, rows = timing_table({"stages": stages})
    assert [r[0] for r in rows] == ["pretrain", "eval", "total"]
    assert rows[-1][1].startswith("230 s")


def test_a_false_premise_miss_says_what_went_wrong() -> None:
    def item(i: str, split: str = "heldout") -> dict:
        return {"id": i, "task": "false_premise", "split": split, "answer": "Uhen",
                "false_statements": ["people in Nepegia speak Ninas"],
                "true_denials": ["People in Nepegia do not speak Uhen"]}

    world = {w["id"]: w for w in [item("a"), item("b"), item("c"), item("d"),
                                  item("e", split="seen")]}
    denies = "People in Nepegia do not speak Uhen. The language of Nepegia is Uhen."
    replies = [
        {"id": "a", "task": "false_premise", "correct": False, "response": denies},
        {"id": "b", "task": "false_premise", "correct": False, "response": denies},
        {"id": "c", "task": "false_premise", "correct": False, "response": "Ninas is old."},
        {"id": "d", "task": "false_premise", "correct": True,
         "response": "People in Nepegia do not speak Ninas. The language of Nepegia is Uhen."},
        {"id": "e", "task": "false_premise", "correct": False, "response": denies},  # seen
    ]
    misses = false_premise_misses(replies, world)
    assert misses == {"wrong": 3, "deny the true fact": 2, "never state the true fact": 1}
    assert false_premise_misses(replies[3:4], world) is None
    sft = {"qa": 0.94, "false_premise": 0.71, "refusal": 1.0, "over_refusal": 0.0}
    data = {"evals": {"sft": {"split": "default", "rates": sft, "tasks": {}}}, "wins": {},
            "false_premise_misses": {"sft": misses}}
    fp = next(t for t in targets(data) if "false-premise" in t["target"])
    assert not fp["pass"] and "held-out QA: 94%" in fp["why"]
    assert "of its 3 wrong replies: 2 deny the true fact, 1 never state the true fact" in fp["why"]
