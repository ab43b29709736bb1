"""Evaluation inside a training run: before / after, at stage ends and every N steps, keeping the best model.

A mixin of :class:`~finetune.training.runner.FineTuneRecipe` (it uses the job's accelerator, model, samples,
state, metrics and `save_final`), kept apart so the training loop reads on its own.
"""

from __future__ import annotations

from finetune.constrained import JsonConstraint
from finetune.evaluation import evaluate, write_eval
from finetune.schema import schema_from_skeleton
from finetune.training.engine import zero_stage


class EvaluationSteps:
    """Generate-and-score evaluations of a running job."""

    def _answer_schema(self, model) -> None:
        """The answer schema (skeleton refined by the training targets) scored as conformance, and the grammar for
        constrained decoding with bounds sized from the training targets."""
        e = self.recipe.eval
        targets = [s.target for s in self.train_samples]
        self.answer_schema = schema_from_skeleton(self.recipe.data.prompt.skeleton, targets)
        self.constraint = None
        if e.constrained:
            self.constraint = JsonConstraint.for_model(
                model,
                self.family,
                self.processor,
                self.recipe.data.prompt.skeleton,
                examples=targets,
                max_string_length=e.max_string_length,
            )
            self._info(
                f"constrained decoding: the answer schema, strings up to {self.constraint.max_string_length} "
                f"characters, lists up to {self.constraint.max_items} items"
            )

    def evaluate(self, tag: str, samples=None, *, report: bool = True) -> dict:
        """Generate on the eval split (or `samples`) and score; writes `eval/{tag}_predictions.jsonl`,
        `_metrics.json` and `_report.html`."""
        e, acc = self.recipe.eval, self.accelerator
        result = evaluate(
            self.model,
            self.eval_samples if samples is None else samples,
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
        if acc.is_main_process:
            title = f"{self.run_dir.name}: {tag} (step {self.state.global_step})"
            write_eval(result, self.run_dir / "eval", prefix=f"{tag}_", report=report and e.report, title=title)
            if tag == "after":
                write_eval(result, self.run_dir, report=e.report, title=title)  # the run folder's predictions
        scalars = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        group = "during" if tag.startswith(("step", "stage")) else tag  # one chart per metric across the run
        acc.log({f"eval/{group}/{k}": v for k, v in scalars.items()}, step=self.state.global_step)
        m = result.metrics
        self._info(
            f"eval {tag}: JSON exact match {m['json_exact_match']:.1%} ({e.headline}), field F1 "
            f"{m['field_f1']:.3f}, nTED acc {m['ted_accuracy']:.3f}, valid JSON {m['valid_json_rate']:.1%}, "
            f"n={m['num_samples']}"
        )
        return result.metrics

    def _evaluate_during(self, tag: str) -> dict:
        """A mid-training evaluation on the capped subset; keeps best/ (the model scoring highest on
        eval.best_metric so far) and records the history in metrics.json."""
        e = self.recipe.eval
        subset = self.eval_samples[: e.during_training_samples] if e.during_training_samples else self.eval_samples
        result = self.evaluate(tag, subset, report=tag.startswith("stage"))
        self.last_eval = value = float(result[e.best_metric])
        self.metrics.setdefault("during", []).append(
            {
                "step": self.state.global_step,
                "stage": self.stages[self.state.stage].name,
                "tag": tag,
                **{k: v for k, v in result.items() if isinstance(v, (int, float))},
            }
        )
        best = self.metrics.get("best")
        # A resumed run may have changed the metric or the subset: an old best is then no yardstick.
        comparable = best is not None and best["metric"] == e.best_metric and best["samples"] == len(subset)
        if not comparable or value > best["value"]:
            self.save_final(self.run_dir / "best")
            self.metrics["best"] = {
                "metric": e.best_metric,
                "value": value,
                "step": self.state.global_step,
                "tag": tag,
                "samples": len(subset),
            }
            self._info(f"best {e.best_metric} so far ({value:.3f}): saved to {self.run_dir / 'best'}")
        self._save_metrics()
        return result

    def _forget_evaluations_after(self, step: int) -> None:
        """On resume: evaluations a crashed run made after its last checkpoint are made again."""
        if "during" in self.metrics:
            self.metrics["during"] = [d for d in self.metrics["during"] if d["step"] <= step]
