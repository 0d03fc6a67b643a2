"""Counts for docs/security.md: the bad-input cases of the security test modules, by CVE class,
and the fuzzing examples, as one run of those tests measures them.

    .venv/bin/python scripts/security_counts.py          # the bounded fuzzing tier (~1.5 min)
    .venv/bin/python scripts/security_counts.py --long   # plus the long fuzzing run (minutes)

Each collected test case counts once (a parametrized case is one case). "handled cleanly" is a
passing case: nearly all of them assert the one-line refusal (exit 2 on the CLI); the few that
check what must still work (a signed artifact with its key, a pinned id) assert that it works.
"not clean" is a failing or erroring case. A test function not in GROUPS is counted under
"(ungrouped)", so a new test is never silently left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["tests/optc/test_security.py", "tests/optc/test_bad_input.py", "tests/optc/test_fuzz.py"]

TRAVERSAL = "CVE-2022-25882 / CVE-2024-27318: a path that leaves its folder (`../`, `a/../../`, absolute)"
LINKS = "CVE-2026-27489: a symbolic link that leaves its folder"
EXTERNAL_KEYS = "CVE-2026-34445 class (as issue 16 names it): external-data entries beyond the spec, a key twice"
WRITES = "CVE-2025-51480 class: writing or deleting outside what optc owns (`-o`, `--force`, staging)"
TRUST = "no CVE: trust of an artifact (ids, signatures, tampered or missing files, staging)"
MANIFEST = "no CVE: an edited manifest (types, ranges, unknown keys, bounds from the compiled graph)"
INPUT_MODEL = "no CVE: a broken or absurd input model (truncated, dims, not a decoder)"
CONFIG = "no CVE: configs and options (YAML, claims a pass cannot deliver, tokenizer, text)"
API = "no CVE: the Python API (token ids, sampling options)"
CLI = "no CVE: the command line (backends, export, tracebacks)"

GROUPS = {
    "test_external_data_escaping_model_dir": TRAVERSAL,
    "test_manifest_path_escaping_dir": TRAVERSAL,
    "test_external_data_locations_that_leave_the_model_folder_are_refused": None,  # by parameter below
    "test_manifest_that_is_a_link_is_refused": LINKS,
    "test_a_listed_artifact_file_that_links_outside_is_refused": LINKS,
    "test_external_data_entries_beyond_the_spec_are_refused": EXTERNAL_KEYS,
    "test_duplicate_external_data_location_is_refused": EXTERNAL_KEYS,
    "test_force_never_deletes_a_folder_of_user_files": WRITES,
    "test_force_never_replaces_the_input_models_folder_or_a_parent": WRITES,
    "test_output_is_never_the_current_directory_or_holds_the_config": WRITES,
    "test_read_only_parent_is_refused_before_any_work": WRITES,
    "test_stale_staging_of_a_killed_compile_is_cleaned_and_permissions_are_ordinary": WRITES,
    "test_output_dir_exists": WRITES,
    "test_force_may_replace_a_signed_artifact": WRITES,
    "test_artifact_id_pins_what_is_loaded": TRUST,
    "test_a_staging_directory_is_never_loadable": TRUST,
    "test_signed_artifact_loads_only_with_a_trusted_key": TRUST,
    "test_tampered_file": TRUST,
    "test_missing_file": TRUST,
    "test_unsupported_format_version": TRUST,
    "test_not_an_artifact": TRUST,
    "test_edited_session_options_are_refused_by_type": MANIFEST,
    "test_edited_manifest_cache_section_is_refused_by_type": MANIFEST,
    "test_an_edited_vocab_size_cannot_widen_the_token_bound": MANIFEST,
    "test_the_manifest_names_the_embedding_table_and_the_graph_decides_the_bound": MANIFEST,
    "test_edited_model_and_backend_sections_are_refused": MANIFEST,
    "test_listed_names_the_file_system_cannot_take_are_refused": TRUST,
    "test_found_manifest_names_of_any_kind_give_one_line_errors": MANIFEST,
    "test_tvm_backend_section_is_type_checked_before_the_library_loads": MANIFEST,
    "test_embedding_rows_are_read_from_the_graph_bytes": MANIFEST,
    "test_embedding_rows_of_broken_bytes_is_none_or_a_wire_error": MANIFEST,
    "test_missing_onnx": INPUT_MODEL,
    "test_truncated_onnx": INPUT_MODEL,
    "test_truncated_external_data": INPUT_MODEL,
    "test_not_a_decoder_graph": INPUT_MODEL,
    "test_decoder_without_attention_is_diagnosed": INPUT_MODEL,
    "test_absurd_input_graph_dimensions_are_refused": INPUT_MODEL,
    "test_bad_config": CONFIG,
    "test_pass_that_matches_nothing_fails_by_default": CONFIG,
    "test_configs_that_claim_what_they_cannot_deliver_are_refused": CONFIG,
    "test_non_utf8_config_and_eval_text_are_clean_errors": CONFIG,
    "test_malformed_tokenizer_is_refused": CONFIG,
    "test_found_a_control_character_in_yaml_is_a_one_line_error": CONFIG,
    "test_found_yaml_keys_of_any_kind_give_one_line_errors": CONFIG,
    "test_prefill_refuses_ids_it_would_have_coerced": API,
    "test_decode_needs_a_prefill_and_an_integer": API,
    "test_generate_refuses_nonsense_sampling_options": API,
    "test_cli_run_with_nan_temperature_is_a_clean_error": API,
    "test_unknown_backend_and_npu_target": CLI,
    "test_cli_error_has_no_traceback_in_a_real_process": CLI,
    "test_export_bad_hf_dir": CLI,
}
BY_PARAMETER = {"dotdot": TRAVERSAL, "inner_dotdot": TRAVERSAL, "absolute": TRAVERSAL,
                "symlink_file": LINKS, "symlink_dir": LINKS}


def group_of(name: str) -> str | None:
    """The group of one test case (None: a fuzzing property, counted by its examples)."""
    function, _, param = name.partition("[")
    if function.startswith("test_fuzz_"):
        return None
    if function not in GROUPS:
        return "(ungrouped)"
    return GROUPS[function] or BY_PARAMETER[param.rstrip("]")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true", help="also the long fuzzing run (OPTC_FUZZ_LONG=1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml, tally = Path(tmp) / "junit.xml", Path(tmp) / "tally.json"
        env = {**os.environ, "OPTC_FUZZ_TALLY": str(tally)}
        if args.long:
            env["OPTC_FUZZ_LONG"] = "1"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        *MODULES], cwd=ROOT, env=env, check=False)
        cases = ET.parse(xml).getroot().iter("testcase")
        fuzz_examples = json.loads(tally.read_text()) if tally.is_file() else {}
        counts: dict[str, Counter] = defaultdict(Counter)
        fuzz_failed = Counter()
        for case in cases:
            name = case.get("name")
            outcome = ("skipped" if case.find("skipped") is not None else
                       "not clean" if case.find("failure") is not None or case.find("error") is not None
                       else "refused cleanly")
            group = group_of(name)
            if group is None:
                if outcome == "not clean":
                    fuzz_failed[name.removeprefix("test_fuzz_").split("_")[0]] += 1
                continue
            counts[group][outcome] += 1

    print("| class | cases tried | handled cleanly | not clean (crash, traceback, exit 3) | skipped here |")
    print("|---|---:|---:|---:|---:|")
    total = Counter()
    for group in sorted(counts, key=lambda g: (g.startswith("no CVE") or g.startswith("("), g)):
        c = counts[group]
        tried = c["refused cleanly"] + c["not clean"] + c["skipped"]
        total.update(c)
        total["tried"] += tried
        print(f"| {group} | {tried} | {c['refused cleanly']} | {c['not clean']} | {c['skipped']} |")
    print(f"| **all** | **{total['tried']}** | **{total['refused cleanly']}** | **{total['not clean']}** | "
          f"**{total['skipped']}** |")
    print()
    print("| fuzzed property | examples run | refused with optc's one-line error | accepted (and checked) | "
          "failing tests |")
    print("|---|---:|---:|---:|---:|")
    for prop in ("config", "manifest", "prefill"):
        refused, accepted = fuzz_examples.get(f"{prop}/refused", 0), fuzz_examples.get(f"{prop}/accepted", 0)
        print(f"| {prop} | {refused + accepted} | {refused} | {accepted} | {fuzz_failed[prop]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
