"""assignments.py: well-formed exercise regions, hand-outs whose failing tests are exactly the
mapped ones."""
import os

import pytest

import assignments
from conftest import ROOT, run_main, run_script

EX = assignments.find_exercises()
MAP = assignments.load_map()
CHEAP = "int4_pack"  # an exercise whose tests are few and fast: the runs of the default suite


def test_eight_to_twelve_exercises_each_graded_by_an_existing_test():
    assert 8 <= len(EX) <= 12
    assert set(MAP) == set(EX), "tests/exercises.json is stale: run `python assignments.py --map`"
    for name, tests in MAP.items():
        assert tests, f"exercise {name} is graded by no test"
        for t in tests:
            file, func = t.split("::")
            assert f"def {func.split('[')[0]}(" in open(os.path.join(ROOT, file)).read(), t


def test_each_exercise_has_focused_tests_that_its_removal_fails():
    """`pytest -k NAME` selects tests named after the exercise; each is one the measured record says
    fails when the exercise alone is removed (it really grades it)."""
    for name in EX:
        mine = assignments.focused(name)
        assert mine, f"no test is named after exercise {name}"
        measured = {t.split("[")[0] for t in MAP[name]}
        assert set(mine) <= measured, (name, sorted(set(mine) - measured))


def test_strip_keeps_the_markers_and_raises_the_task(tmp_path):
    src = "def f(x):\n    # exercise sq: return x squared\n    y = x * x\n    return y\n    # end exercise sq\n"
    (tmp_path / "m.py").write_text(src)
    ex = assignments.find_exercises(str(tmp_path))
    out = assignments.strip(src, ex["sq"]["regions"])
    assert out == ('def f(x):\n    # exercise sq: return x squared\n    raise NotImplementedError("exercise sq: return x squared")\n    # end exercise sq\n')


@pytest.mark.parametrize("src, msg", [
    ("# exercise a: t\nx = 1\n", "never closed"),
    ("# exercise a: t\n# exercise b: u\nx = 1\n# end exercise b\n# end exercise a\n", "opens inside"),
    ("x = 1\n# end exercise a\n", "without its opening"),
    ("# exercise a: t\n# end exercise a\n", "is empty"),
])
def test_malformed_markers_are_named(tmp_path, src, msg):
    (tmp_path / "m.py").write_text(src)
    with pytest.raises(ValueError, match=msg):
        assignments.find_exercises(str(tmp_path))


def test_list_shows_every_exercise_with_its_focused_tests_first():
    r = run_main("assignments.py", "--list")
    assert r.returncode == 0, r.stderr
    for name, tests in MAP.items():
        mine = assignments.focused(name)
        block = r.stdout.split(f"\n{name} ", 1)[1] if not r.stdout.startswith(f"{name} ") else r.stdout
        assert f"graded first by {len(mine)} focused tests (python -m pytest -k {name})" in block
        also = [t for t in tests if t.split("[")[0] not in mine]
        assert block.index(mine[0]) < block.index(f"then also by {len(also)} more tests")


@pytest.mark.parametrize("args, msg", [
    (["--only", "nope"], "unknown exercise nope"),
    (["--out", ROOT], "is the project itself"),
    (["--out", "NONEMPTY"], "not an empty folder"),
    ([], "give --out"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, msg):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    args = [str(full) if a == "NONEMPTY" else a for a in args]
    if "--out" not in args and args:
        args += ["--out", str(tmp_path / "new")]
    before = sorted(os.listdir(ROOT))
    r = run_main("assignments.py", *args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "new").exists() and os.listdir(full) == ["keep.txt"] and sorted(os.listdir(ROOT)) == before


def failures(out_dir, only=None):
    """Writes a hand-out (all exercises, or `only`), runs its student tier, returns {failed test:
    message}. With `only`, the tests that can fail are the ones the all-removed hand-out fails (the
    record's union, which test_full_handout_fails_exactly_the_mapped_tests holds): only those run."""
    r = run_script("assignments.py", "--out", str(out_dir), *(["--only", only] if only else []))
    assert r.returncode == 0, r.stderr
    tests = sorted({t.split("[")[0] for ts in MAP.values() for t in ts}) if only else ()
    return {t: m for t, m in assignments.run_suite(str(out_dir), tests).items() if m is not None}


def check(failed, names):
    expected = set().union(*(MAP[n] for n in names))
    assert set(failed) == expected, (f"fail but not mapped: {sorted(set(failed) - expected)}; mapped but pass: {sorted(expected - set(failed))}")
    for t, msg in failed.items():
        assert "NotImplementedError" in msg and "exercise " in msg, (t, msg[-500:])


@pytest.mark.slow
def test_full_handout_fails_exactly_the_mapped_tests(tmp_path):
    check(failures(tmp_path / "handout"), list(EX))


@pytest.mark.slow
def test_only_one_exercise_fails_only_its_tests(tmp_path):
    check(failures(tmp_path / "handout", CHEAP), [CHEAP])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EX))
def test_each_exercise_alone_fails_only_its_tests(tmp_path, name):
    check(failures(tmp_path / "handout", name), [name])


def test_every_exercise_stores_two_or_more_wrong_answers_that_differ_from_the_reference():
    wrong = assignments.load_wrong(exercises=EX)  # raises if an answer's regions do not match the exercise's
    assert set(wrong) == set(EX)
    for name, answers in wrong.items():
        assert len(answers) >= 2, name
        for a in answers:
            assert a["why"] and any(c is not None for c in a["code"]), (name, a)


@pytest.mark.slow
def test_check_catches_each_wrong_answer_of_an_exercise():
    r = run_script("assignments.py", "--check", "--only", CHEAP, timeout=900)  # 72 tests + 3
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(assignments.load_wrong()[CHEAP])
    assert r.stdout.count("caught by ") == n and "FAILS" not in r.stdout and "NOT CAUGHT" not in r.stdout


@pytest.mark.slow
def test_check_reports_a_wrong_answer_the_tests_miss(tmp_path):
    # a "wrong answer" that is the reference itself must be reported as not caught: exit 1
    import json
    import shutil
    root = tmp_path / "proj"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__"))
    region = EX["q_sample"]["regions"][0]
    lines = open(os.path.join(ROOT, region[0])).read().split("\n")
    ref = "\n".join(line[len(region[3]):] for line in lines[region[1]:region[2] + 1])
    path = root / assignments.WRONG_FILE
    wrong = json.loads(path.read_text())
    wrong["q_sample"] = [{"why": "the reference in disguise", "code": [ref]}]
    path.write_text(json.dumps(wrong))
    missed = assignments.check_wrong_answers(["q_sample"], root=str(root), log=lambda *a: None)
    assert missed == ["q_sample: the reference in disguise"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EX))
def test_each_exercise_rejects_its_wrong_answers(name):
    r = run_script("assignments.py", "--check", "--only", name)
    assert r.returncode == 0, r.stdout + r.stderr
