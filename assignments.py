"""Course hand-outs: a copy of the project with chosen exercise regions removed, and how to grade
them.

An exercise is a region of a stage file between two one-line comments, readable in place:

    # exercise NAME: one-sentence task
    ...the code a student writes...
    # end exercise NAME

A name may mark several regions (pack and unpack, say). The hand-out keeps both comments and
replaces the code between them by `raise NotImplementedError("exercise NAME: <task>")` at the same
indentation. Two sets of tests grade NAME:
  focused   the tests named after it (`python -m pytest -k NAME`): they call the student's code
            directly against hand values or a reference, and run in seconds;
  also      every test of the student tier that fails when NAME alone is removed. Measured, not
            guessed: `python assignments.py --map` generates one hand-out per exercise, runs the
            suite in each and records the failures in tests/exercises.json (the slow tier of
            tests/test_assignments.py checks that the record still holds).

    python assignments.py --list                         # exercises, their task and their tests
    python assignments.py --out handout                  # every exercise removed
    python assignments.py --out handout --only paley int4_pack
    python assignments.py --check --only int4_pack         # each stored wrong answer must fail its tests

A test that passes on a wrong answer grades nothing. tests/wrong_answers.json holds two to four
plausible wrong answers per exercise (code a student could write: no sign extension, σ = 0, α fixed,
...); `--check` puts each into a copy of the project in place of the reference code and runs that
exercise's focused tests, which must fail, and runs them once on the unchanged copy, where they
must pass.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import common

ROOT = os.path.dirname(os.path.abspath(__file__))
MAP_FILE = os.path.join("tests", "exercises.json")
WRONG_FILE = os.path.join("tests", "wrong_answers.json")
# not handed out
TOOL_FILES = ("assignments.py", os.path.join("tests", "test_assignments.py"), WRONG_FILE)
SKIP_DIRS = ("__pycache__", "runs")
OPEN = re.compile(r"^(\s*)# exercise ([a-z0-9_]+): (.+?)\s*$")
CLOSE = re.compile(r"^(\s*)# end exercise ([a-z0-9_]+)\s*$")


#################################################################################
#                          Finding the exercise regions                         #
#################################################################################

def project_files(root=ROOT, exclude=None):
    """Relative paths of the project's files: git's tracked and not-ignored ones in a checkout
    (with git installed), else a walk without hidden folders, caches and run outputs; nothing under
    `exclude`."""
    files = None
    if os.path.isdir(os.path.join(root, ".git")):
        try:
            ls = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                                cwd=root,
                                capture_output=True, text=True)
            if ls.returncode == 0:
                files = [f for f in ls.stdout.splitlines() if os.path.isfile(os.path.join(root, f))]
        except OSError:  # no git on this machine
            pass
    if files is None:
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in SKIP_DIRS)
            files += [os.path.relpath(os.path.join(d, f), root) for f in sorted(names) if not f.endswith(".pyc")]
    if exclude:
        exclude = os.path.abspath(exclude) + os.sep
        files = [f for f in files if not os.path.abspath(os.path.join(root, f)).startswith(exclude)]
    return files


def find_exercises(root=ROOT):
    """-> {name: {"task": str, "regions": [(file, first, last, indent, task)]}} (0-based inner line
    range)."""
    ex = {}
    for rel in project_files(root):
        if not rel.endswith(".py") or rel in TOOL_FILES:
            continue
        lines = open(os.path.join(root, rel), encoding="utf-8").read().split("\n")
        cur = None
        for i, line in enumerate(lines):
            m, c = OPEN.match(line), CLOSE.match(line)
            if m:
                if cur:
                    raise ValueError(f"{rel}:{i + 1}: exercise {m[2]} opens inside exercise {cur[0]}")
                cur = (m[2], i, m[1], m[3])
            elif c:
                if not cur or c[2] != cur[0]:
                    raise ValueError(f"{rel}:{i + 1}: 'end exercise {c[2]}' without its opening comment")
                name, start, indent, task = cur
                if i == start + 1:
                    raise ValueError(f"{rel}:{start + 1}: exercise {name} is empty")
                e = ex.setdefault(name, {"task": task, "regions": []})
                e["regions"].append((rel, start + 1, i - 1, indent, task))
                cur = None
        if cur:
            raise ValueError(f"{rel}:{cur[1] + 1}: exercise {cur[0]} is never closed")
    return ex


def focused(name, root=ROOT):
    """The tests named after exercise `name` (what `pytest -k name` selects), as node ids."""
    out = []
    for f in sorted(os.listdir(os.path.join(root, "tests"))):
        if f.startswith("test_") and f.endswith(".py"):
            src = open(os.path.join(root, "tests", f), encoding="utf-8").read()
            out += [f"tests/{f}::{t}" for t in re.findall(r"^def (test_\w+)\(", src, re.M) if name in t]
    return out


def load_map(root=ROOT):
    path = os.path.join(root, MAP_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python assignments.py --map` to measure it")
    return json.load(open(path))


def load_wrong(root=ROOT, exercises=None):
    """-> {name: [{"why": str, "code": [region code or None (the reference kept), one per
    region]}]}."""
    wrong = json.load(open(os.path.join(root, WRONG_FILE), encoding="utf-8"))
    exercises = exercises or find_exercises(root)
    for name, answers in wrong.items():
        if name not in exercises:
            raise ValueError(f"{WRONG_FILE}: unknown exercise {name}")
        for a in answers:
            if len(a["code"]) != len(exercises[name]["regions"]):
                raise ValueError(f"{WRONG_FILE}: {name} '{a['why']}' gives {len(a['code'])} regions, the exercise has {len(exercises[name]['regions'])}")
    return wrong


#################################################################################
#                               Writing a hand-out                               #
#################################################################################

def strip(text, regions, codes=None):
    """Replaces the inner lines of each region by one raise (the marker comments stay), or by
    codes[i] (unindented source; None keeps region i as it is)."""
    lines = text.split("\n")
    codes = codes or [""] * len(regions)
    # bottom up
    for (_, first, last, indent, task), code in sorted(zip(regions, codes),
                                                       key=lambda rc: -rc[0][1]):
        if code is None:
            continue
        if code:
            lines[first:last + 1] = [indent + line if line else line for line in code.split("\n")]
            continue
        name = OPEN.match(lines[first - 1])[2]
        msg = f"exercise {name}: {task}".replace("\\", "\\\\").replace('"', '\\"')
        lines[first:last + 1] = [f'{indent}raise NotImplementedError("{msg}")']
    return "\n".join(lines)


def check_out(out, root=ROOT):
    out, root = os.path.realpath(out), os.path.realpath(root)
    if out == root or root.startswith(out + os.sep):
        raise ValueError(f"--out {out} is the project itself (or contains it); choose a new folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out} exists and is not an empty folder; nothing written")


def write_handout(out, names, root=ROOT, exercises=None, codes=None):
    """Copies the project to `out` with the exercises `names` removed (or, for one name, its regions
    replaced by `codes`: a stored wrong answer); returns the files changed."""
    exercises = exercises or find_exercises(root)
    unknown = [n for n in names if n not in exercises]
    if unknown:
        raise ValueError(f"unknown exercise {', '.join(unknown)}; choose from {', '.join(exercises)}")
    check_out(out, root)
    by_file = {}
    for n in names:
        for i, r in enumerate(exercises[n]["regions"]):
            by_file.setdefault(r[0], []).append((r, codes[i] if codes else ""))
    # listed before writing
    files = [f for f in project_files(root, exclude=out) if f not in TOOL_FILES]
    for rel in files:
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if rel in by_file:
            with open(dst, "w", encoding="utf-8") as f:
                regions, region_codes = zip(*by_file[rel])
                f.write(strip(open(os.path.join(root, rel), encoding="utf-8").read(), regions,
                              region_codes))
        else:
            shutil.copy2(os.path.join(root, rel), dst)
    return sorted(by_file)


#################################################################################
#                  Measuring which tests grade which exercise                   #
#################################################################################

def run_suite(folder, tests=(), timeout=3600, first_failure=False):
    """Runs pytest in `folder` -> {node id: failure message or None (passed)}; first_failure: stop
    there."""
    xml = os.path.join(folder, "runs", "junit.xml")
    os.makedirs(os.path.dirname(xml), exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *(["-x"] if first_failure else []), *tests]
    try:
        subprocess.run(cmd, cwd=folder, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # a wrong answer that never ends is caught too
        return {f"(the tests ran past {timeout} s)": "timeout"}
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        file = case.get("classname").replace(".", "/") + ".py"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        results[f"{file}::{case.get('name')}"] = None if bad is None else (bad.get("message") or "") + (bad.text or "")
    return results


def measure_map(root=ROOT, tests=()):
    """One full hand-out run, then one run per exercise over the tests the full run failed; with
    `tests` (node ids or files), only those are run, to update the record after adding tests."""
    ex = find_exercises(root)
    with tempfile.TemporaryDirectory() as tmp:
        write_handout(os.path.join(tmp, "all"), list(ex), root, ex)
        res = run_suite(os.path.join(tmp, "all"), tests)
        failed = sorted(t for t, msg in res.items() if msg is not None)
        print(f"all exercises removed: {len(failed)} of {len(res)} tests fail", file=sys.stderr)
        mapping = {}
        for n in ex:
            write_handout(os.path.join(tmp, n), [n], root, ex)
            res = run_suite(os.path.join(tmp, n), failed) if failed else {}
            mapping[n] = sorted(t for t, msg in res.items() if msg is not None)
            print(f"{n}: {len(mapping[n])} tests", file=sys.stderr)
            shutil.rmtree(os.path.join(tmp, n))
    return mapping, sorted(res)


def check_wrong_answers(names, root=ROOT, log=print):
    """Each stored wrong answer of each exercise in `names`, in a copy of the project, against the
    exercise's focused tests -> the answers no test caught, plus "reference" if the unchanged copy
    fails them."""
    ex = find_exercises(root)
    mapping = {n: focused(n, root) for n in names}
    wrong, missed = load_wrong(root, ex), []
    for n in names:
        if not mapping.get(n) or not wrong.get(n):
            missed.append(f"{n}: {'no tests' if not mapping.get(n) else 'no wrong answers stored'}")
            log(missed[-1])
    names = [n for n in names if mapping.get(n) and wrong.get(n)]
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "reference")
        # a plain copy: the reference must pass every test concerned, once
        write_handout(ref, [], root, ex)
        tests = sorted(set().union(*(mapping[n] for n in names))) if names else []
        bad = sorted(t for t, msg in run_suite(ref, tests).items() if msg is not None) if tests else []
        log(f"reference: {len(tests) - len(bad)} of {len(tests)} tests pass" + (f"; FAILS {bad[:3]}" if bad else ""))
        for n in names:
            if any(t in bad for t in mapping[n]):
                missed.append(f"{n}: reference")
            log(f"{n}:")
            for i, answer in enumerate(wrong[n]):
                out = os.path.join(tmp, f"{n}_{i}")
                write_handout(out, [n], root, ex, codes=answer["code"])
                caught = sorted(t for t,
                                msg in run_suite(out, mapping[n], 900, True).items() if msg is not None)
                log(f"  {'caught by ' + caught[0] if caught else 'NOT CAUGHT'}: {answer['why']}")
                if not caught:
                    missed.append(f"{n}: {answer['why']}")
                shutil.rmtree(out)
    return missed


#################################################################################
#                                     CLI                                       #
#################################################################################

def main(argv=None):
    ap = common.Parser(description="Write a course hand-out: the project with chosen exercise regions replaced by NotImplementedError, and the tests that grade each.")
    ap.add_argument("--out", help="new (or empty) folder for the hand-out")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="remove only these exercises (default: all)")
    ap.add_argument("--list", action="store_true",
                    help="show the exercises, their task and their tests")
    ap.add_argument("--map", action="store_true",
                    help=f"re-measure {MAP_FILE} (runs the suite once per exercise)")
    ap.add_argument("--tests", nargs="+", default=[], metavar="TEST",
                    help="with --map: re-measure only these test files or node ids, keep the rest")
    ap.add_argument("--check", action="store_true",
                    help=f"every wrong answer in {WRONG_FILE} must fail its exercise's focused tests (with --only: those exercises)")
    args = ap.parse_args(argv)
    ex = find_exercises()
    if args.map:
        mapping, _ = measure_map(tests=args.tests)
        if args.tests:  # an update: these tests' entries re-measured, every other entry kept
            old, ran = load_map(), set(args.tests)
            keep = lambda t: t not in ran and t.split("::")[0] not in ran
            mapping = {n: sorted({t for t in old.get(n, []) if keep(t)} | set(mapping[n])) for n in ex}
        common.atomic_write_text(os.path.join(ROOT, MAP_FILE), json.dumps(mapping, indent=1) + "\n")
        print(f"wrote {MAP_FILE}")
        return
    mapping = load_map()
    names = args.only or list(ex)
    unknown = [n for n in names if n not in ex]
    if unknown:
        raise ValueError(f"unknown exercise {', '.join(unknown)}; choose from {', '.join(ex)}")
    if args.check:
        missed = check_wrong_answers(names)
        if missed:
            print(f"{len(missed)} not as they should be:\n  " + "\n  ".join(missed),
                  file=sys.stderr)
            sys.exit(1)
        print(f"every stored wrong answer of {len(names)} exercises fails its tests; the reference passes")
        return
    if args.list:
        for n in names:
            where = ", ".join(f"{r[0]}:{r[1]}" for r in ex[n]["regions"])
            mine = focused(n)
            also = [t for t in mapping.get(n, []) if t.split("[")[0] not in mine]
            print(f"{n:14s} {ex[n]['task']}\n{'':14s} in {where}; graded first by {len(mine)} focused tests (python -m pytest -k {n}):")
            print("".join(f"{'':16s}{t}\n" for t in mine), end="")
            print(f"{'':14s} then also by {len(also)} more tests of the student tier:")
            print("".join(f"{'':16s}{t}\n" for t in also))
        return
    if not args.out:
        raise ValueError("give --out DIR (or --list); see --help")
    changed = write_handout(args.out, names, exercises=ex)
    print(f"wrote {args.out}: {len(names)} exercises removed in {', '.join(changed)}")
    for n in names:
        print(f"\n{n}: {ex[n]['task']}\n  grade: cd {args.out} && python -m pytest -k {n}   (then: python -m pytest, {len(mapping.get(n, []))} tests depend on it)")


if __name__ == "__main__":
    common.run_cli(main)
