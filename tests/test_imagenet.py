"""ImageNet: the packaged class list, and evaluation of 1000-class models on ImageNet-layout folders."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from bcosvit.errors import DataError
from bcosvit.imagenet import imagenet_class_names, imagenet_wnids, is_wnid, parse_classes

ROOT = Path(__file__).resolve().parents[1]


def test_the_packaged_list_holds_1000_distinct_sorted_wordnet_ids_with_names():
    wnids, names = imagenet_wnids(), imagenet_class_names()
    assert len(wnids) == len(names) == 1000
    assert len(set(wnids)) == 1000 and wnids == sorted(wnids) and all(is_wnid(w) for w in wnids)
    assert all(isinstance(name, str) and name for name in names)


@pytest.mark.parametrize(
    ("index", "wnid", "name"),
    [
        (0, "n01440764", "tench"),
        (1, "n01443537", "goldfish"),
        (134, "n02012849", "crane bird"),  # the two cranes and the two maillots have distinct names
        (207, "n02099601", "golden retriever"),
        (517, "n03126707", "crane"),
        (999, "n15075141", "toilet tissue"),
    ],
)
def test_known_classes_sit_at_their_imagenet_index(index, wnid, name):
    assert imagenet_wnids()[index] == wnid and imagenet_class_names()[index] == name


def test_callers_get_their_own_lists():
    imagenet_wnids().clear()
    imagenet_class_names()[0] = "changed"
    assert imagenet_wnids()[0] == "n01440764" and imagenet_class_names()[0] == "tench"


def test_the_class_list_ships_as_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "imagenet_classes.json" in config["tool"]["setuptools"]["package-data"]["bcosvit"]


def _class_list(entries) -> str:
    return json.dumps({"classes": entries})


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([["n00000001", "a"]] * 999, "lists 999 classes, expected 1000"),
        ([[f"n{i:08d}", "x"] for i in range(999)] + [["dog", "x"]], "class 999 is .*expected \\[WordNet id"),
        ([[f"n{i:08d}", "x"] for i in range(999)] + [["n00000998", ""]], "class 999"),
        ([[f"n{999 - i:08d}", "x"] for i in range(1000)], "not distinct and sorted"),
        ([[f"n{min(i, 998):08d}", "x"] for i in range(1000)], "not distinct and sorted"),
    ],
    ids=["too few", "not a wnid", "empty name", "unsorted", "repeated"],
)
def test_a_damaged_class_list_is_refused_naming_the_problem(entries, message):
    with pytest.raises(DataError, match=message):
        parse_classes(_class_list(entries), "list.json")
    with pytest.raises(DataError, match="not an ImageNet class list"):
        parse_classes("[1, 2]", "list.json")
