"""transcoder_extract: every token's transcoder-adapter features -> sparse Parquet (Ray Data actors).

    python -m ray_jobs.transcoder_extract --config configs/demo.yaml

Ray Data reads `prepare/tokens` (splits `transcoder_extract.splits`), cuts it into blocks of
`transcoder_extract.batch_docs` documents and streams them through `transcoder_extract.actors`
actors (`rank1_core.transcoder.FeatureEncoder`), each holding the base model with the trained
adapters (`transcoder/adapter`). An actor writes one file per batch into `features/` and
`tokens/`, named by the batch's documents and renamed into place; files no batch reported
are deleted at the end and every token is checked to be present exactly once. A partial run
with the same config resumes (finished batches are skipped). Then DuckDB counts each
feature's firing and ranks its top contexts with topk's SQL to find hesitation features.
Leaves in the stage folder:

- `features/part-*.parquet`: doc_id int64, pos int32, feature int32, value float32, one row
  per (token, active latent) — the layout of `sae/features`, so topk's sparse path, autointerp
  and the dashboards read it as they read SAE features. Feature f is latent f % d_latent of
  layer f // d_latent (name `F%05d`).
- `tokens/part-*.parquet`: doc_id, pos, token_id, token, split (extract/tokens' layout).
- `latents.parquet`: feature, name, layer, latent, live, count, freq, mean_act, max_act,
  dec_norm, enc_norm (one row per latent of every adapted layer).
- `hesitation_features.parquet`: features with hesitation contexts: contexts, matches,
  share, selected (the set transcoder_eval ablates), top_tokens, next_tokens, ...
- `summary.json` (also the manifest's `extra`).
"""

from __future__ import annotations

import math

from rank1_core.config import Config
from ray_jobs.common import ensure_ray, execute, stage_cli

STAGE = "transcoder_extract"
TABLES = ("features", "tokens")


def run(cfg: Config, force: bool = False) -> dict:
    from rank1_core import activations as A
    from rank1_core import sql as S
    from rank1_core.rundir import RunDir
    from rank1_core.transcoder import (TranscoderAdapter, feature_summary, hesitation_candidates,
                                       hesitation_table, latents_table, select_hesitation)

    ec = cfg.transcoder_extract

    def body(sr):
        run = RunDir(cfg.run.dir)
        st, prep, tcs = sr.stage, run.stage("prepare"), run.stage("transcoder")
        with sr.timed("check"):
            count = A.count_input(prep, ec.splits)
            adapter = TranscoderAdapter.load(tcs.path("adapter"), tcs.fs)
        ray = ensure_ray(cfg)
        with sr.timed("encode"):
            ds = ray.data.read_parquet(prep.uri_of("tokens")).select_columns(["doc_id", "split", "input_ids"])
            ds = ds.repartition(target_num_rows_per_block=ec.batch_docs)
            from rank1_core.transcoder import FeatureEncoder

            ds = ds.map_batches(
                FeatureEncoder,
                fn_constructor_kwargs=dict(
                    model_dir=cfg.model, transcoder_dir=tcs.uri_of("adapter"), out_uri=st.uri,
                    batch_tokens=ec.batch_tokens, dtype=cfg.model.dtype,
                    torch_threads=ec.torch_threads or max(1, math.ceil(ec.cpus_per_actor)), splits=tuple(ec.splits)),
                batch_size=ec.batch_docs, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=ec.actors),
                num_cpus=ec.cpus_per_actor)
            summaries = list(ds.iter_rows())
        with sr.timed("finalize"):
            files, deleted = A.finalize_batches(st, summaries, TABLES)
            counts = A.verify_exactly_once(st, count.tokens, ("tokens",))
        with sr.timed("latents_and_hesitation"):
            con = S.connect(None, memory_limit="2GB", threads=2)
            S.register_views(con, run, ["transcoder_features", "transcoder_tokens"])  # rank1_core.sql.VIEWS
            fired = feature_summary(con, "transcoder_features")
            lat = latents_table(adapter, fired, count.tokens)
            st.write_parquet("latents.parquet", lat)
            cands = hesitation_candidates(con, "transcoder_features", "transcoder_tokens", ec.hesitation,
                                          log=lambda m: print(m, flush=True))
            con.close()
            selected = select_hesitation(cands, ec.hesitation)
            hes = hesitation_table(cands, selected, lat)
            st.write_parquet("hesitation_features.parquet", hes)
        n_rows = int(sum(int(s["rows"]) for s in summaries))
        live = int(sum(lat.column("live").to_pylist()))
        summary = {
            "tokens": count.tokens, "docs": count.docs, "feature_rows": n_rows, "latents": lat.num_rows,
            "live_features": live, "dead_fraction": 1.0 - live / max(lat.num_rows, 1),
            "l0_per_token": n_rows / max(count.tokens, 1), "hesitation_candidates": int((cands["matches"] > 0).sum()),
            "hesitation_features": len(selected), "hesitation_selected": [int(f) for f in selected],
            "splits": list(ec.splits), "batches_resumed": int(sum(bool(s["skipped"]) for s in summaries)),
            "leftover_files_deleted": deleted,
        }
        st.write_json("summary.json", summary)
        sr.rows.update({"tokens": counts["tokens"], "feature_rows": n_rows, "files": len(files),
                        "latents": lat.num_rows, "live_features": live, "hesitation_features": len(selected)})
        sr.extra.update(summary)
        print(f"[{STAGE}] {count.tokens} tokens -> {n_rows} feature rows ({summary['l0_per_token']:.1f} per token); "
              f"live {live}/{lat.num_rows}; {len(selected)} hesitation features "
              f"(of {summary['hesitation_candidates']} with a hesitation context)", flush=True)

    return execute(cfg, STAGE, body, force=force, resumable=True)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
