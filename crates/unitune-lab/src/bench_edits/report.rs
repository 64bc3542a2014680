//! The report of a bench-edits run: Markdown tables, one JSON object, and an example grid.

use std::fmt::Write as _;
use std::path::Path;

use image::RgbImage;
use serde_json::json;
use unitune::image_io::{contact_sheet, save_png};
use unitune::session::DeltaEncoding;
use unitune::Result;

use super::{mean, BenchEditsConfig, Measurement, Row, HELD_OUT_START, KEPT_DB};
use crate::world::follow::FollowingCounts;
use crate::world::score::edit_kind;

/// The row of `method` that did best: highest success rate, then highest mean PSNR (in + out).
pub fn best<'a>(rows: &'a [Row], method: &str) -> Option<&'a Row> {
    let score = |r: &Row| {
        let m = |v: &[Option<f64>]| mean(v.iter().flatten().copied()).unwrap_or(0.0);
        (r.success_rate(), m(&r.psnr_in) + m(&r.psnr_out))
    };
    rows.iter().filter(|r| r.method == method).max_by(|a, b| {
        let (a, b) = (score(a), score(b));
        a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1))
    })
}

/// Cells upscaled `scale` times (nearest), so that the small scenes are easy to see.
pub fn write_grid(m: &Measurement, scale: u32, path: &Path) -> Result<()> {
    let (rows, samples) = (&m.rows, &m.samples);
    let columns: Vec<(&str, Option<&Row>)> = vec![
        ("BASE", best(rows, "identity")),
        ("TRUTH", best(rows, "truth")),
        ("UNITUNE", best(rows, "unitune")),
        ("DEFAULTS", best(rows, "defaults")),
        ("SDEDIT", best(rows, "sdedit")),
        ("PLAIN", best(rows, "plain")),
    ];
    let present: Vec<(&str, &Row)> = columns
        .into_iter()
        .filter_map(|(name, row)| row.map(|r| (name, r)))
        .collect();
    let mut cells = vec![];
    for i in 0..samples.len() {
        for (_, row) in &present {
            let cell = &row.images[i];
            cells.push(image::imageops::resize(
                cell,
                cell.width() * scale,
                cell.height() * scale,
                image::imageops::FilterType::Nearest,
            ));
        }
    }
    let row_labels: Vec<String> = samples
        .iter()
        .map(|s| edit_kind(&s.edit).to_uppercase())
        .collect();
    let column_labels: Vec<String> = present.iter().map(|(n, _)| n.to_string()).collect();
    let settings: Vec<String> = present
        .iter()
        .filter(|(_, r)| matches!(r.method, "unitune" | "defaults" | "sdedit"))
        .map(|(_, r)| format!("{} {}", r.method, r.setting))
        .collect();
    let sheet: RgbImage = contact_sheet(
        &cells,
        &row_labels,
        &column_labels,
        Some(&settings.join("; ")),
    )?;
    save_png(&sheet, path)?;
    Ok(())
}

fn fmt_opt(x: Option<f64>, decimals: usize) -> String {
    x.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.decimals$}"))
}

/// Markdown tables: the scenes, the tunes, then methods x settings.
pub fn to_tables(a: &BenchEditsConfig, m: &Measurement) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {}; {} held-out scenes (seed {}, indices {}..), {}x{}, up to {} objects; {} sampling steps\n",
        m.model,
        m.samples.len(),
        a.seed,
        HELD_OUT_START,
        m.config.width,
        m.config.height,
        m.config.max_objects,
        a.steps
    );
    let _ = writeln!(s, "| scene | kind | instruction |\n|---|---|---|");
    for (i, sample) in m.samples.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {i} | {} | {} |",
            edit_kind(&sample.edit),
            sample.instruction
        );
    }
    let stored = match (a.tune_delta_encoding, a.delta_encoding) {
        (Some(tuned), Some(stored)) if tuned != stored => {
            format!("tuned for {tuned}, stored as {stored}")
        }
        (_, Some(stored)) => stored.to_string(),
        (_, None) => "each tune's code".to_string(),
    };
    let _ = writeln!(
        s,
        "\n| UniTune tune ({} steps unless said) | s per tune | final loss | reconstruction PSNR (dB) | session ({stored}, % of the UNet in f32) |\n|---|---|---|---|---|",
        a.tune_steps
    );
    for t in &m.tunes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            t.label,
            fmt_opt(mean(t.seconds.iter().copied()), 1),
            fmt_opt(mean(t.final_loss.iter().copied()), 4),
            fmt_opt(mean(t.reconstruction.iter().copied()), 1),
            fmt_opt(mean(t.session_share.iter().map(|x| 100.0 * x)), 1)
        );
    }
    let _ = writeln!(
        s,
        "\n| method | setting | PSNR in (dB) | PSNR out (dB) | success | success, out >= {KEPT_DB} dB | s per edit |\n|---|---|---|---|---|---|---|"
    );
    for r in &m.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {}/{} | {}/{} | {} |",
            r.method,
            r.setting,
            fmt_opt(mean(r.psnr_in.iter().flatten().copied()), 1),
            fmt_opt(mean(r.psnr_out.iter().flatten().copied()), 1),
            r.success.iter().filter(|&&x| x).count(),
            r.success.len(),
            r.kept(),
            r.success.len(),
            fmt_opt(mean(r.seconds.iter().copied()), 2)
        );
    }
    let kinds = ["colour", "shape", "add", "remove", "background"];
    let _ = writeln!(
        s,
        "\nSuccess by kind of edit, best setting of each method:\n\n| method | setting | {} |\n|---|---|{}",
        kinds.join(" | "),
        "---|".repeat(kinds.len())
    );
    for method in [
        "identity", "truth", "vae", "unitune", "defaults", "sdedit", "plain",
    ] {
        let Some(row) = best(&m.rows, method) else {
            continue;
        };
        let cells: Vec<String> = kinds
            .iter()
            .map(|kind| {
                let of_kind: Vec<bool> = m
                    .samples
                    .iter()
                    .zip(&row.success)
                    .filter(|(sample, _)| edit_kind(&sample.edit) == *kind)
                    .map(|(_, &ok)| ok)
                    .collect();
                let hits = of_kind.iter().filter(|&&ok| ok).count();
                format!("{hits}/{}", of_kind.len())
            })
            .collect();
        let _ = writeln!(s, "| {method} | {} | {} |", row.setting, cells.join(" | "));
    }
    let _ = writeln!(
        s,
        "\nCaption-following (the picture shows the edit prompt's background, object colours, object shapes, object count; all four):\n\n| method | setting | background | colour | shape | count | all |\n|---|---|---|---|---|---|---|"
    );
    for row in m.rows.iter().filter(|r| r.method == "plain") {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            row.method,
            row.setting,
            following_cells(row)
        );
    }
    s
}

/// The row's caption-following cells ([`FollowingCounts::cells`]).
fn following_cells(row: &Row) -> String {
    FollowingCounts::of(&row.following).cells().join(" | ")
}

/// One JSON object with every number of the run.
pub fn to_json(a: &BenchEditsConfig, m: &Measurement) -> serde_json::Value {
    let finite = |x: f64| x.is_finite().then_some(x);
    let scenes: Vec<_> = m
        .samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "index": HELD_OUT_START + i as u64,
                "kind": edit_kind(&s.edit),
                "instruction": s.instruction,
                "caption": s.caption,
                "prompt": s.prompt,
            })
        })
        .collect();
    let tunes: Vec<_> = m
        .tunes
        .iter()
        .map(|t| {
            let nums = |v: &[f64]| v.iter().map(|&x| finite(x)).collect::<Vec<_>>();
            json!({
                "label": t.label,
                "lr": t.lr,
                "steps": t.steps,
                "seconds": nums(&t.seconds),
                "final_loss": nums(&t.final_loss),
                "reconstruction_psnr": nums(&t.reconstruction),
                "session_share": nums(&t.session_share),
            })
        })
        .collect();
    let rows: Vec<_> = m
        .rows
        .iter()
        .map(|r| {
            let opts = |v: &[Option<f64>]| v.iter().map(|x| x.and_then(finite)).collect::<Vec<_>>();
            json!({
                "method": r.method,
                "setting": r.setting,
                "psnr_in": opts(&r.psnr_in),
                "psnr_out": opts(&r.psnr_out),
                "success": r.success,
                "following": r.following.iter().map(|f| json!({
                    "background": f.background,
                    "colour": f.colour,
                    "shape": f.shape,
                    "count": f.count,
                })).collect::<Vec<_>>(),
                "seconds": r.seconds.iter().map(|&x| finite(x)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "bench": "edits",
        "model": m.model,
        "seed": a.seed,
        "first_index": HELD_OUT_START,
        "size": m.config.width,
        "max_objects": m.config.max_objects,
        "steps": a.steps,
        "tune_steps": a.tune_steps,
        "delta_encoding": a.delta_encoding.map(DeltaEncoding::name),
        "tune_delta_encoding": a.tune_delta_encoding.or(a.delta_encoding).map(DeltaEncoding::name),
        "tune_layers": a.tune_layers,
        "lora_rank": a.lora_rank,
        "scenes": scenes,
        "tunes": tunes,
        "rows": rows,
    })
}
