"""Evaluation inside a training run: before / after, at stage ends and every N steps, keeping the best model.

:class:`RunEvaluator` owns what evaluating a running job needs and keeps: the answer schema and the decoding
constraint (sized from the training targets), the metrics history (`metrics.json`) and the best score so far.
The runner hands it the model to evaluate and a function that saves a model folder (for `best/`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finetune.config import ResolvedRecipe
from finetune.constrained import JsonConstraint, answer_record, default_bounds
from finetune.data.target_stats import target_field_stats
from finetune.evaluation import evaluate, write_eval
from finetune.metrics import METRICS_VERSION, field_changes
from finetune.schema import schema_from_skeleton
from finetune.training.engine import zero_stage
from finetune.training.run_folder import load_metrics, save_metrics


def set_aside_outdated(metrics: dict, info: Callable) -> dict:
    """A run's metrics history, with the scores made under other scoring rules (a run resumed across an upgrade)
    moved under `outdated`: a new score is then compared with neither the old `before` nor the old `best`."""
    version = metrics.get("metrics_version", 1)
    if not metrics or version == METRICS_VERSION:
        return {**metrics, "metrics_version": METRICS_VERSION}
    outdated = {k: v for k, v in metrics.items() if k not in ("outdated", "metrics_version")}
    info(
        f"note: this run's earlier scores ({', '.join(sorted(outdated))}) were made under scoring rules version "
        f"{version}, now {METRICS_VERSION}; kept in metrics.json under 'outdated', not compared with new ones"
    )
    return {"metrics_version": METRICS_VERSION, "outdated": {"metrics_version": version, **outdated}}


class RunEvaluator:
    """Generate-and-score evaluations of one run, with their history and the best model so far."""

    def __init__(
        self,
        recipe: ResolvedRecipe,
        *,
        family,
        processor,
        accelerator,
        run_dir: Path,
        instruction_text: str,
        train_targets: list[dict],
        eval_samples: list,
        model,
        info: Callable,
    ):
        self.recipe, self.family, self.processor, self.accelerator = recipe, family, processor, accelerator
        self.run_dir, self.instruction_text, self.samples, self._info = run_dir, instruction_text, eval_samples, info
        skeleton = recipe.data.prompt.skeleton
        # Conformance is scored against the skeleton refined by the training targets, never the gold answers.
        self.answer_schema = schema_from_skeleton(skeleton, train_targets)
        self.train_fields = target_field_stats(skeleton, train_targets)  # shown in each report beside the gold's
        # The decoding bounds, sized from the training targets; saved with every model folder (`answer`), also when
        # this run does not decode constrained, so that eval / predict --constrained use them later.
        self.max_string_length, self.max_items = default_bounds(
            train_targets, max_string_length=recipe.eval.max_string_length
        )
        self.constraint = None
        if recipe.eval.constrained:
            self.constraint = JsonConstraint.for_model(
                model,
                family,
                processor,
                skeleton,
                examples=train_targets,
                max_string_length=self.max_string_length,
                max_items=self.max_items,
            )
            info(
                f"constrained decoding: the answer schema, strings up to {self.constraint.max_string_length} "
                f"characters, lists up to {self.constraint.max_items} items"
            )
            if self.constraint.token_budget > recipe.eval.max_new_tokens:
                info(
                    f"warning: eval.max_new_tokens {recipe.eval.max_new_tokens} may cut answers: the longest the "
                    f"decoding bounds allow takes up to {self.constraint.token_budget} tokens of this tokenizer; cut "
                    f"answers are reported as truncated"
                )
        self.metrics: dict = set_aside_outdated(load_metrics(run_dir), info)  # a resumed run continues its history
        self.last_value = float("nan")  # the latest during-training score, for the progress bar
        # (tag, metrics) of the evaluation a preference stage started from: evaluations on as many samples during
        # that stage get the change per field since then (`field_changes`, in metrics.json and the report).
        self.since: tuple[str, dict] | None = None

    def answer(self) -> dict:
        """The answer schema and decoding bounds a saved model folder keeps (prompt.json `answer`)."""
        return answer_record(self.answer_schema, self.max_string_length, self.max_items)

    def evaluate(self, model, tag: str, step: int, samples=None, *, report: bool = True) -> dict:
        """Generate on the eval split (or `samples`) and score; writes `eval/{tag}_predictions.jsonl`,
        `_metrics.json` and `_report.html` (and, for `after`, the run folder's own predictions and report)."""
        e, acc = self.recipe.eval, self.accelerator
        result = evaluate(
            model,
            self.samples if samples is None else samples,
            family=self.family,
            processor=self.processor,
            instruction_text=self.instruction_text,
            accelerator=acc,
            batch_size=e.batch_size,
            max_new_tokens=e.max_new_tokens,
            # ZeRO-3 shards every weight: all ranks must run every forward until the last finishes.
            synced_ranks=zero_stage(acc) == 3 and acc.num_processes > 1,
            constraint=self.constraint,
            skeleton=self.recipe.data.prompt.skeleton,
            headline=e.headline,
            schema=self.answer_schema,
        )
        since = self.since
        if since is not None and since[1].get("num_samples") == result.metrics["num_samples"]:
            changes = field_changes(since[1], result.metrics)
            result.metrics["field_changes"] = {"since": since[0], "fields": changes}
            self._info(f"eval {tag}: per field since {since[0]}: {_change_line(since[1], result.metrics)}")
        if acc.is_main_process:
            title = f"{self.run_dir.name}: {tag} (step {step})"
            fields = self.train_fields
            write_eval(
                result,
                self.run_dir / "eval",
                prefix=f"{tag}_",
                report=report and e.report,
                title=title,
                train_fields=fields,
            )
            if tag == "after":
                write_eval(result, self.run_dir, report=e.report, title=title, train_fields=fields)
        scalars = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        group = "during" if tag.startswith(("step", "stage")) else tag  # one chart per metric across the run
        acc.log({f"eval/{group}/{k}": v for k, v in scalars.items()}, step=step)
        m = result.metrics
        self._info(
            f"eval {tag}: JSON exact match {m['json_exact_match']:.1%} ({e.headline}), field F1 "
            f"{m['field_f1']:.3f}, nTED acc {m['ted_accuracy']:.3f}, valid JSON {m['valid_json_rate']:.1%}, filled but "
            f"should be empty {m['hallucinated_field_rate']:.1%}, "
            f"n={m['num_samples']}"
        )
        return result.metrics

    def evaluate_during(self, model, tag: str, step: int, stage_name: str, save_best: Callable[[Path], None]) -> dict:
        """A mid-training evaluation on the capped subset; `save_best(folder)` saves the model when it scores best
        so far on eval.best_metric; the history goes to metrics.json."""
        e = self.recipe.eval
        subset = self.samples[: e.during_training_samples] if e.during_training_samples else self.samples
        result = self.evaluate(model, tag, step, subset, report=tag.startswith("stage"))
        self.last_value = value = float(result[e.best_metric])
        self.metrics.setdefault("during", []).append(
            {
                "step": step,
                "stage": stage_name,
                "tag": tag,
                **{k: v for k, v in result.items() if isinstance(v, (int, float))},
            }
        )
        best = self.metrics.get("best")
        # A resumed run may have changed the metric or the subset: an old best is then no yardstick.
        comparable = best is not None and best["metric"] == e.best_metric and best["samples"] == len(subset)
        if not comparable or value > best["value"]:
            save_best(self.run_dir / "best")
            self.metrics["best"] = {
                "metric": e.best_metric,
                "value": value,
                "step": step,
                "tag": tag,
                "samples": len(subset),
            }
            self._info(f"best {e.best_metric} so far ({value:.3f}): saved to {self.run_dir / 'best'}")
        self.save()
        return result

    def last_during_step(self) -> int | None:
        during = self.metrics.get("during") or []
        return during[-1]["step"] if during else None

    def forget_after(self, step: int) -> None:
        """On resume: evaluations a crashed run made after its last checkpoint are made again."""
        if "during" in self.metrics:
            self.metrics["during"] = [d for d in self.metrics["during"] if d["step"] <= step]

    def save(self) -> None:
        if self.accelerator.is_main_process:
            save_metrics(self.run_dir, self.metrics)


def _change_line(before: dict, after: dict) -> str:
    """Totals over the fields, before → after: wrong values, missed values, fields filled that should be empty."""

    def total(metrics: dict, outcome: str) -> int:
        return sum(counts.get(outcome, 0) for counts in metrics["per_field"].values())

    names = {"wrong": "wrong values", "missed": "missed", "hallucinated": "filled but should be empty"}
    return ", ".join(f"{name} {total(before, k)} -> {total(after, k)}" for k, name in names.items())
