"""Release recipes: one TOML file, one command, every artifact of a model family verified, with a manifest.

    recipe.py    the recipe schema (a table of sections, keys and types), parsing, errors at ``file:line``
    plan.py      recipe -> jobs (model x format), source resolution and hashing, artifact keys, --only
    build.py     prepare_model (one statistics pass, one reference pass) and build_artifact (build, verify,
                 card via ``qconvert.card``, atomic rename): the two functions both executors call
    manifest.py  manifest.json (deterministic, atomic, resumable) and timings.json
    report.py    report.md
    runner.py    run_release: the local and Ray executors

    qconvert release recipes/demo.toml --out out/demo [--only PATTERN] [--executor ray] [--resume]
"""

from qconvert.release.recipe import Recipe, RecipeError, load_recipe
from qconvert.release.runner import Outcome, run_release

__all__ = ["Outcome", "Recipe", "RecipeError", "load_recipe", "run_release"]
