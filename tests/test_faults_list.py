"""The planted-fault list of scripts/check_tests_catch_faults.py still fits the code: every fault's
old text occurs in its file and the tests it names exist. Planting the faults takes minutes and is
not part of the suite; this check takes a second and keeps the list from drifting (a fault whose
old text the code no longer contains would otherwise only show when someone runs the script)."""
import importlib.util
import re

from conftest import ROOT


def load_faults():
    spec = importlib.util.spec_from_file_location("faults", ROOT / "scripts" / "check_tests_catch_faults.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines FAULTS; planting runs only under __main__
    return mod.FAULTS


def test_every_planted_fault_applies_to_the_code_and_names_existing_tests():
    faults = load_faults()
    names = [f[0] for f in faults]
    assert len(names) == len(set(names)), "two faults share a name"
    for name, path, old, new, tests in faults:
        src = (ROOT / path).read_text()
        assert old in src, f"fault {name}: {path} no longer contains its old text {old[:60]!r}"
        assert new != old and src.replace(old, new) != src, f"fault {name} changes nothing"
        for nodeid in tests.split():
            file, _, func = nodeid.partition("::")
            func = func.split("[")[0]
            text = (ROOT / file).read_text()
            assert re.search(rf"^def {re.escape(func)}\(", text, re.M), \
                f"fault {name}: {file} has no test {func}"
