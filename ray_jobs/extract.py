"""extract: per-token adapter activations and baseline MLP neurons -> Parquet (Ray Data actors).

    python -m ray_jobs.extract --config configs/demo.yaml

Ray Data reads `prepare/tokens`, cuts it into blocks of `extract.batch_docs` documents and
streams them through a pool of `extract.actors` actors (`rank1_core.activations.Extractor`),
each of which loads the model with `train/adapter` once and writes one file per batch into
`extract/{activations,neurons,tokens}/`, named by the batch's documents and renamed into
place. Actors return only a one-row summary per batch, so the driver and the object store
never hold activations. A retried batch (an actor died) rewrites its own file names; files no
successful batch reported are deleted at the end; then every (doc_id, pos) is checked to be
present exactly once. A partial run with the same config resumes: finished batches are skipped.
"""

from __future__ import annotations

import math

from rank1_core.config import Config
from ray_jobs.common import ensure_ray, execute, stage_cli
from ray_jobs.progress import Progress

STAGE = "extract"


def run(cfg: Config, force: bool = False, *, crash: dict | None = None) -> dict:
    """Run the stage. `crash` is a test hook passed to the actors (see `Extractor`)."""
    from rank1_core import activations as A
    from rank1_core.models import hf_config_for
    from rank1_core.rundir import RunDir

    ec = cfg.extract

    def body(sr):
        run = RunDir(cfg.run.dir)
        st, prep, train = sr.stage, run.stage("prepare"), run.stage("train")
        with sr.timed("check"):
            count = A.count_input(prep, ec.splits)
            adapter = A.local_adapter(train)
            hf = hf_config_for(cfg.model)
            num_layers = int(hf.num_hidden_layers)
            info = A.read_adapter(adapter, num_layers)
            n_neurons = min(ec.mlp_neurons, int(hf.intermediate_size))
            A.write_atomic(st.fs, st.path("components.parquet"), A.components_table(info), "zstd")
            A.write_atomic(st.fs, st.path("neuron_catalogue.parquet"),
                           A.neuron_catalogue_table(num_layers, n_neurons), "zstd")
        tables = A.TABLES if n_neurons else ("activations", "tokens")

        ray = ensure_ray(cfg)
        with sr.timed("extract"):
            ds = ray.data.read_parquet(prep.uri_of("tokens")).select_columns(["doc_id", "split", "input_ids"])
            # Streaming split into blocks of batch_docs rows (no all-to-all shuffle), so
            # every actor gets work even when prepare wrote a single file.
            ds = ds.repartition(target_num_rows_per_block=ec.batch_docs)
            gpu = ec.gpus_per_actor > 0
            ds = ds.map_batches(
                A.Extractor,
                fn_constructor_kwargs=dict(
                    model_dir=cfg.model, adapter_dir=None, run_uri=cfg.run.dir, stage=STAGE, stage_folder=st.folder,
                    mlp_neurons=n_neurons, batch_tokens=ec.batch_tokens,
                    dtype=ec.dtype or cfg.model.dtype, device="cuda" if gpu else "cpu",
                    torch_threads=ec.torch_threads or max(1, math.ceil(ec.cpus_per_actor)),
                    compression=ec.compression, splits=tuple(ec.splits), crash=crash,
                ),
                batch_size=ec.batch_docs, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=ec.actors),
                num_cpus=ec.cpus_per_actor, num_gpus=ec.gpus_per_actor if gpu else None,
            )
            summaries = []
            with Progress(STAGE, total=count.tokens, main="tokens", unit="tok") as p:
                for s in ds.iter_rows():
                    summaries.append(s)
                    p.update(int(s["tokens"]), docs=int(s["docs"]))
        with sr.timed("finalize"):
            files, deleted = A.finalize_batches(st, summaries, tables)
            counts = A.verify_exactly_once(st, count.tokens, tables)
            A.check_columns(st, files[0], info, num_layers, n_neurons)
        secs = sr.timings.get("extract") or 1e-9
        sr.rows.update({"docs": count.docs, "tokens": count.tokens, "files": len(files),
                        "components": len(info.components), "neurons": num_layers * n_neurons,
                        **{f"rows:{t}": n for t, n in counts.items()}})
        sr.extra.update({
            "tokens_per_s": round(count.tokens / secs, 1),
            "batches_resumed": int(sum(bool(s["skipped"]) for s in summaries)),
            "leftover_files_deleted": deleted,
            "actor_pids": sorted({int(s["pid"]) for s in summaries}),
            "actor_max_rss_mb": round(max(float(s["max_rss_mb"]) for s in summaries), 1),
            # CPU seconds of the actors that reported (model loading included), all threads
            "actor_cpu_s": round(sum(max(float(s["cpu_s"]) for s in summaries if s["pid"] == pid)
                                     for pid in {int(s["pid"]) for s in summaries}), 1),
            "splits": list(ec.splits),
        })

    return execute(cfg, STAGE, body, force=force, resumable=True)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
