//! A batch of edits of one tuned session: every combination of prompts x seeds x guidance values x
//! start values, so that UniTune's per-image parameter search runs on one loaded model.
//!
//! Names: every edit has a suffix for each dimension that varies, in this order: `-p<N>` (the N-th
//! prompt, from 1, when there are several), `-seed<S>` (with several seeds), `-g<G>` (when guidance
//! is swept), `-t<T0>` (when the start is swept), e.g. `-p2-seed43-g8-t0.9`; one edit alone has
//! none. A sweep's contact sheet (columns: guidance, rows: start) is `[-p<N>][-seed<S>]-sheet`.

use image::RgbImage;

use crate::image_io::{contact_sheet, tensor_to_image};
use crate::noise::Noise;
use crate::pipelines::{
    edit, prompt_with_token, EditBase, EditMask, EditRequest, Mask, Progress, StableDiffusion,
};
use crate::{Error, Result};

/// The edits to run. `request` holds every knob shared by the edits (its `guidance_scale` and
/// `start` are the values used where they are not swept; its `token` and `prompt` are set per
/// edit); [`EditRequest::new`] has the defaults.
#[derive(Debug, Clone)]
pub struct EditJob {
    pub request: EditRequest,
    /// The edit prompts; the session's token is put in front of each unless it has it.
    pub prompts: Vec<String>,
    /// The first seed; `None`: a random one.
    pub seed: Option<u64>,
    /// Seeds per prompt: `seed`, `seed + 1`, ...
    pub seeds: usize,
    /// Guidance scales to sweep (the contact sheet's columns); empty: `request.guidance_scale`.
    pub sweep_guidance: Vec<f64>,
    /// Start fractions to sweep (the contact sheet's rows); empty: `request.start`.
    pub sweep_start: Vec<f64>,
}

/// The largest prompts file read: a thousand prompts of a full 77-token context fit in a tenth
/// of it; more would mean hours of edits, or a file that is not a prompt list.
pub const MAX_PROMPTS_FILE_BYTES: u64 = 1 << 20;

/// Reads a prompts file: one prompt per line, blank lines skipped. An empty, binary or oversized
/// file is an error naming it.
pub fn read_prompts_file(path: &std::path::Path) -> Result<Vec<String>> {
    let text = crate::error::read_text(path, MAX_PROMPTS_FILE_BYTES)?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        return Err(Error::argument(
            "prompts",
            format!("{} has no prompt (one per line)", path.display()),
        ));
    }
    Ok(prompts)
}

/// One edit of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct EditItem {
    /// Index into [`EditJob::prompts`].
    pub prompt: usize,
    pub seed: u64,
    pub guidance: f64,
    pub start: f64,
    /// What tells this edit apart from the others of the job (see the module doc).
    pub suffix: String,
}

/// The edits of one prompt and seed; with a sweep, they make one contact sheet.
#[derive(Debug, Clone, PartialEq)]
pub struct EditGroup {
    pub prompt: usize,
    pub seed: u64,
    /// Row-major in the contact sheet: rows are starts, columns guidance values.
    pub items: Vec<EditItem>,
    /// The contact sheet's suffix, when guidance or start is swept.
    pub sheet: Option<String>,
}

/// What a running [`Editor`] hands its caller, in order.
pub enum EditEvent<'a> {
    /// The `index`-th edit (from 1) of `total` begins; `prompt` is the edit prompt with its token.
    Started {
        item: &'a EditItem,
        prompt: &'a str,
        index: usize,
        total: usize,
    },
    /// An edit is done: the result, and with an auto-mask the mask it found (feathered).
    Finished {
        item: &'a EditItem,
        image: &'a RgbImage,
        auto_mask: Option<&'a Mask>,
    },
    /// A sweep's contact sheet, after the last edit of its group.
    Sheet {
        group: &'a EditGroup,
        image: &'a RgbImage,
    },
}

impl EditJob {
    /// One edit of each prompt with the default knobs and a random seed.
    pub fn new(prompts: Vec<String>) -> Self {
        Self {
            request: EditRequest::new("", ""),
            prompts,
            seed: None,
            seeds: 1,
            sweep_guidance: vec![],
            sweep_start: vec![],
        }
    }

    /// Every edit and sheet, grouped by prompt and seed, starting at seed `seed`. Checks the
    /// shape of the job (prompts, seeds, distinct sweep values); [`Editor::check`] checks the knobs.
    pub fn plan(&self, seed: u64) -> Result<Vec<EditGroup>> {
        if self.prompts.is_empty() {
            return Err(Error::argument("prompt", "no edit prompt given"));
        }
        if self.seeds == 0 {
            return Err(Error::argument("seeds", "must be at least 1"));
        }
        let guidances = sweep_or(
            &self.sweep_guidance,
            self.request.guidance_scale,
            "sweep-guidance",
        )?;
        let starts = sweep_or(&self.sweep_start, self.request.start, "sweep-start")?;
        let (sweep_guidance, sweep_start) = (
            !self.sweep_guidance.is_empty(),
            !self.sweep_start.is_empty(),
        );
        let mut groups = Vec::new();
        for prompt in 0..self.prompts.len() {
            for k in 0..self.seeds {
                let seed = seed.wrapping_add(k as u64);
                let mut group_suffix = String::new();
                if self.prompts.len() > 1 {
                    group_suffix += &format!("-p{}", prompt + 1);
                }
                if self.seeds > 1 {
                    group_suffix += &format!("-seed{seed}");
                }
                let mut items = Vec::new();
                for &start in &starts {
                    for &guidance in &guidances {
                        let mut suffix = group_suffix.clone();
                        if sweep_guidance {
                            suffix += &format!("-g{guidance}");
                        }
                        if sweep_start {
                            suffix += &format!("-t{start}");
                        }
                        items.push(EditItem {
                            prompt,
                            seed,
                            guidance,
                            start,
                            suffix,
                        });
                    }
                }
                let sheet =
                    (sweep_guidance || sweep_start).then(|| format!("{group_suffix}-sheet"));
                groups.push(EditGroup {
                    prompt,
                    seed,
                    items,
                    sheet,
                });
            }
        }
        Ok(groups)
    }

    /// Checks every edit of `groups` (from [`EditJob::plan`]) for a base picture of `width` x
    /// `height` without encoding anything, e.g. before queueing the job.
    pub fn check(&self, groups: &[EditGroup], width: usize, height: usize) -> Result<()> {
        for item in groups.iter().flat_map(|g| &g.items) {
            self.request(item, "").check_size(width, height)?;
        }
        Ok(())
    }

    /// The request of one edit, for a session whose token is `token`.
    pub fn request(&self, item: &EditItem, token: &str) -> EditRequest {
        EditRequest {
            token: token.to_string(),
            prompt: self.prompts[item.prompt].clone(),
            guidance_scale: item.guidance,
            start: item.start,
            ..self.request.clone()
        }
    }
}

/// The swept values, or the single `value` when there is no sweep; duplicates would collide in
/// the names.
fn sweep_or(values: &[f64], value: f64, name: &str) -> Result<Vec<f64>> {
    if values.is_empty() {
        return Ok(vec![value]);
    }
    for (i, v) in values.iter().enumerate() {
        if values[..i].contains(v) {
            return Err(Error::argument(name, format!("lists {v} twice")));
        }
    }
    Ok(values.to_vec())
}

/// A tuned model ready to edit one picture: the session's image, or another picture of its size
/// (e.g. an earlier edit), encoded once for every edit.
pub struct Editor<'a> {
    sd: &'a StableDiffusion,
    token: String,
    base: EditBase,
}

impl<'a> Editor<'a> {
    /// `sd` holds the tuned UNet (a tune just run, or a session applied); `token` is the
    /// session's.
    pub fn new(sd: &'a StableDiffusion, token: &str, image: RgbImage) -> Result<Self> {
        Ok(Self {
            sd,
            token: token.to_string(),
            base: EditBase::new(sd, image)?,
        })
    }

    /// Checks every edit of `groups` before any runs, so that a bad sweep value fails at once.
    pub fn check(&self, job: &EditJob, groups: &[EditGroup]) -> Result<()> {
        let (w, h) = self.base.image().dimensions();
        job.check(groups, w as usize, h as usize)
    }

    /// Runs every edit of `groups` (from [`EditJob::plan`]), handing each result to `on_event` as
    /// soon as it is done. Every edit of one seed starts from the same noise, so a sweep compares
    /// the knobs alone.
    pub fn run(
        &self,
        job: &EditJob,
        groups: &[EditGroup],
        progress: &mut dyn Progress,
        on_event: &mut dyn FnMut(EditEvent) -> Result<()>,
    ) -> Result<()> {
        self.check(job, groups)?;
        let total: usize = groups.iter().map(|g| g.items.len()).sum();
        let mut index = 0;
        for group in groups {
            let prompt = prompt_with_token(&self.token, &job.prompts[group.prompt]);
            let mut cells = Vec::new();
            for item in &group.items {
                index += 1;
                on_event(EditEvent::Started {
                    item,
                    prompt: &prompt,
                    index,
                    total,
                })?;
                let request = job.request(item, &self.token);
                let out = edit(
                    self.sd,
                    &self.base,
                    &request,
                    &mut Noise::seeded(item.seed),
                    progress,
                )?;
                let image = tensor_to_image(&out.image, 0)?;
                let auto_mask = match request.mask {
                    EditMask::Auto(_) => out.mask.as_ref(),
                    _ => None,
                };
                on_event(EditEvent::Finished {
                    item,
                    image: &image,
                    auto_mask,
                })?;
                cells.push(image);
            }
            if group.sheet.is_some() {
                let image = self.sheet(job, group, &prompt, &cells)?;
                on_event(EditEvent::Sheet {
                    group,
                    image: &image,
                })?;
            }
        }
        Ok(())
    }

    /// The contact sheet of one group: columns `g=<guidance>`, rows `t0=<start>`.
    fn sheet(
        &self,
        job: &EditJob,
        group: &EditGroup,
        prompt: &str,
        cells: &[RgbImage],
    ) -> Result<RgbImage> {
        let guidances = sweep_or(
            &job.sweep_guidance,
            job.request.guidance_scale,
            "sweep-guidance",
        )?;
        let starts = sweep_or(&job.sweep_start, job.request.start, "sweep-start")?;
        let columns: Vec<String> = guidances.iter().map(|g| format!("g={g}")).collect();
        let rows: Vec<String> = starts.iter().map(|t| format!("t0={t}")).collect();
        let title = format!("{prompt} / seed {}", group.seed);
        contact_sheet(cells, &rows, &columns, Some(&title))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of every image and sheet for `--output x.png`.
    fn names(groups: &[EditGroup], output: &str) -> Vec<String> {
        let stem = output.trim_end_matches(".png");
        groups
            .iter()
            .flat_map(|g| {
                g.items
                    .iter()
                    .map(|i| i.suffix.clone())
                    .chain(g.sheet.clone())
            })
            .map(|suffix| format!("{stem}{suffix}.png"))
            .collect()
    }

    fn job(prompts: usize, seeds: usize, guidance: &[f64], start: &[f64]) -> EditJob {
        EditJob {
            seeds,
            sweep_guidance: guidance.to_vec(),
            sweep_start: start.to_vec(),
            ..EditJob::new(vec!["a hat".into(); prompts])
        }
    }

    #[test]
    fn one_edit_keeps_the_output_name() {
        let groups = job(1, 1, &[], &[]).plan(7).unwrap();
        assert_eq!(names(&groups, "out/x.png"), ["out/x.png"]);
    }

    #[test]
    fn names_carry_only_what_varies() {
        let groups = job(2, 2, &[], &[]).plan(42).unwrap();
        assert_eq!(
            names(&groups, "x.png"),
            [
                "x-p1-seed42.png",
                "x-p1-seed43.png",
                "x-p2-seed42.png",
                "x-p2-seed43.png"
            ]
        );
        assert_eq!(groups[3].seed, 43);

        let groups = job(1, 1, &[4.0, 7.5], &[0.8, 0.9]).plan(5).unwrap();
        assert_eq!(
            names(&groups, "x.png"),
            [
                "x-g4-t0.8.png",
                "x-g7.5-t0.8.png",
                "x-g4-t0.9.png",
                "x-g7.5-t0.9.png",
                "x-sheet.png"
            ]
        );
        let groups = job(1, 1, &[4.0, 8.0], &[]).plan(5).unwrap();
        assert_eq!(
            names(&groups, "x.png"),
            ["x-g4.png", "x-g8.png", "x-sheet.png"]
        );
        let item = &groups[0].items[1];
        let request = job(1, 1, &[4.0, 8.0], &[]).request(item, "tok");
        assert_eq!(
            (request.guidance_scale, request.token.as_str()),
            (8.0, "tok")
        );
    }

    #[test]
    fn repeated_sweep_values_are_refused() {
        let err = job(1, 1, &[4.0, 8.0, 4.0], &[])
            .plan(1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("4 twice") && err.contains("sweep-guidance"),
            "{err}"
        );
        assert_eq!(sweep_or(&[], 3.0, "sweep-start").unwrap(), [3.0]);
        assert!(job(0, 1, &[], &[]).plan(1).is_err());
        assert!(job(1, 0, &[], &[]).plan(1).is_err());
    }
}
