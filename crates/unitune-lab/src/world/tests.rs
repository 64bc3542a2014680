//! The world's promises, checked on the pixels: captions are true of the pictures, edits change
//! only their region, the grammar round-trips, and every grammar word is one token.

use std::collections::BTreeSet;

use image::{GrayImage, RgbImage};

use super::*;
use unitune::tokenizer::ClipTokenizer;

fn world() -> World {
    World::new(SceneConfig::default(), 7).unwrap()
}

/// The scene object a caption's description names: colour and shape are unique in a scene.
fn find<'a>(scene: &'a Scene, desc: &ObjectDesc) -> (usize, &'a Object) {
    let found = scene
        .objects
        .iter()
        .enumerate()
        .filter(|(_, o)| o.desc == *desc)
        .collect::<Vec<_>>();
    assert_eq!(found.len(), 1, "{desc:?} in {scene:?}");
    found[0]
}

fn rgb(image: &RgbImage, x: u32, y: u32) -> [u8; 3] {
    image.get_pixel(x, y).0
}

#[test]
fn samples_are_deterministic_per_index() {
    let (scene, image, caption) = world().sample(3);
    let (scene2, image2, caption2) = World::new(SceneConfig::default(), 7).unwrap().sample(3);
    assert_eq!((&scene, &image, &caption), (&scene2, &image2, &caption2));
    assert_eq!(world().scene(3), scene);
    assert_eq!(world().edit_sample(3).scene, scene);
    for other in [
        world().sample(4),
        World::new(SceneConfig::default(), 8).unwrap().sample(3),
    ] {
        assert_ne!(other.0, scene);
        assert_ne!(other.1, image);
    }
}

#[test]
fn objects_show_the_colour_the_caption_names() {
    let world = world();
    for index in 0..40 {
        let (scene, image, caption) = world.sample(index);
        scene.validate().unwrap();
        let description = Description::parse(&caption).unwrap();
        assert_eq!(description.objects.len(), scene.objects.len());
        for desc in &description.objects {
            let (i, object) = find(&scene, desc);
            let mask = scene.object_mask(i, world.config()).unwrap();
            let full: Vec<[u8; 3]> = mask
                .enumerate_pixels()
                .filter(|p| p.2 .0[0] == 255)
                .map(|(x, y, _)| rgb(&image, x, y))
                .collect();
            // A small star, the thinnest shape, covers about 24 whole pixels at 64x64.
            assert!(full.len() >= 15, "{caption}: {} whole pixels", full.len());
            assert!(
                full.iter().all(|&c| c == desc.colour.rgb()),
                "{caption}: {:?}",
                desc
            );
            if desc.shape != Shape::Ring {
                let (cx, cy) = ((object.x * 64.0) as u32, (object.y * 64.0) as u32);
                assert_eq!(
                    rgb(&image, cx, cy),
                    desc.colour.rgb(),
                    "{caption}: centre of {desc:?}"
                );
            }
        }
    }
}

/// The pattern of the background pixels no object touches, read off the pixels at 64x64.
fn read_pattern(image: &RgbImage, free: &GrayImage, colour: Colour) -> Pattern {
    let (first, second) = (colour.rgb(), colour.pattern_rgb());
    let dist = |a: [u8; 3], b: [u8; 3]| {
        a.iter()
            .zip(b)
            .map(|(&x, y)| (x as i32 - y as i32).abs())
            .sum::<i32>()
    };
    // Whether each free pixel is nearer the pattern's second colour; None under objects.
    let is_second = |x: u32, y: u32| {
        let c = rgb(image, x, y);
        (free.get_pixel(x, y).0[0] == 255).then(|| dist(c, second) < dist(c, first))
    };
    let all: Vec<bool> = (0..64)
        .flat_map(|y| (0..64).map(move |x| (x, y)))
        .filter_map(|(x, y)| is_second(x, y))
        .collect();
    let share = all.iter().filter(|&&s| s).count() as f32 / all.len() as f32;
    let columns_uniform = (0..64).all(|x| {
        let column: BTreeSet<bool> = (0..64).filter_map(|y| is_second(x, y)).collect();
        column.len() <= 1
    });
    match share {
        0.0 => Pattern::Plain,
        _ if columns_uniform => Pattern::Striped,
        s if s > 0.4 => Pattern::Checkered,
        _ => Pattern::Dotted,
    }
}

#[test]
fn background_shows_the_captions_colour_and_pattern() {
    let world = world();
    let mut patterns = BTreeSet::new();
    for index in 0..40 {
        let (scene, image, caption) = world.sample(index);
        let background = Description::parse(&caption).unwrap().background;
        // Pixels no object touches.
        let mut free = GrayImage::from_pixel(64, 64, image::Luma([255]));
        for i in 0..scene.objects.len() {
            let mask = scene.object_mask(i, world.config()).unwrap();
            for (f, m) in free.pixels_mut().zip(mask.pixels()) {
                if m.0[0] > 0 {
                    f.0[0] = 0;
                }
            }
        }
        let (first, second) = (background.colour.rgb(), background.colour.pattern_rgb());
        for (x, y, f) in free.enumerate_pixels() {
            let c = rgb(&image, x, y);
            if f.0[0] == 0 {
                continue;
            }
            match background.pattern {
                Pattern::Plain => assert_eq!(c, first, "{caption}"),
                // Dots are anti-aliased: blends of the two colours.
                Pattern::Dotted => assert!((0..3)
                    .all(|k| c[k] >= first[k].min(second[k]) && c[k] <= first[k].max(second[k]))),
                // Stripes and checks fall on pixel edges at 64x64.
                _ => assert!(c == first || c == second, "{caption}: {c:?} at ({x}, {y})"),
            }
        }
        assert_eq!(
            read_pattern(&image, &free, background.colour),
            background.pattern,
            "{caption}"
        );
        patterns.insert(background.pattern.name());
    }
    assert_eq!(patterns.len(), 4, "all patterns drawn: {patterns:?}");
}

#[test]
fn relations_in_captions_match_the_pixels() {
    let world = world();
    let mut layouts = BTreeSet::new();
    for index in 0..60 {
        let (scene, image, caption) = world.sample(index);
        let description = Description::parse(&caption).unwrap();
        // Each object's centre from its pixels: the mask-weighted mean of pixels of its colour.
        let centres: Vec<(f32, f32)> = description
            .objects
            .iter()
            .map(|desc| {
                let mask = scene
                    .object_mask(find(&scene, desc).0, world.config())
                    .unwrap();
                let (mut sx, mut sy, mut sw) = (0.0, 0.0, 0.0);
                for (x, y, m) in mask.enumerate_pixels() {
                    if rgb(&image, x, y) == desc.colour.rgb() {
                        let w = m.0[0] as f32;
                        (sx, sy, sw) =
                            (sx + w * (x as f32 + 0.5), sy + w * (y as f32 + 0.5), sw + w);
                    }
                }
                (sx / sw, sy / sw)
            })
            .collect();
        let along = |a: usize, b: usize, horizontal: bool| {
            let (dx, dy) = (centres[b].0 - centres[a].0, centres[b].1 - centres[a].1);
            if horizontal {
                dx > 0.0 && dx >= 1.5 * dy.abs()
            } else {
                dy > 0.0 && dy >= 1.5 * dx.abs()
            }
        };
        let holds = match description.layout {
            Layout::Alone => centres.len() == 1,
            Layout::Pair(Relation::LeftOf) => along(0, 1, true),
            Layout::Pair(Relation::RightOf) => along(1, 0, true),
            Layout::Pair(Relation::Above) => along(0, 1, false),
            Layout::Pair(Relation::Below) => along(1, 0, false),
            Layout::Row => (1..centres.len()).all(|i| along(i - 1, i, true)),
            Layout::Column => (1..centres.len()).all(|i| along(i - 1, i, false)),
        };
        assert!(holds, "{caption}: centres {centres:?}");
        layouts.insert(format!("{:?}", description.layout));
    }
    assert!(layouts.len() >= 5, "layouts drawn: {layouts:?}");
}

#[test]
fn captions_round_trip_through_the_parser() {
    let world = world();
    for index in 0..300 {
        let (scene, edit) = world.edit(index);
        let edited = scene.apply(&edit).unwrap();
        for (scene, text) in [
            (&scene, scene.caption()),
            (&edited, edit.prompt(&scene).unwrap()),
        ] {
            assert_eq!(
                Description::parse(&text).unwrap(),
                scene.describe(),
                "{text}"
            );
        }
    }
    let example = "a small red circle left of an orange square on a striped yellow background";
    let parsed = Description::parse(example).unwrap();
    assert_eq!(parsed.layout, Layout::Pair(Relation::LeftOf));
    assert_eq!(
        parsed.objects[0],
        ObjectDesc {
            size: Size::Small,
            colour: Colour::Red,
            shape: Shape::Circle
        }
    );
    assert_eq!(parsed.objects[1].size, Size::Medium);
    assert_eq!(
        parsed.background,
        Background {
            colour: Colour::Yellow,
            pattern: Pattern::Striped
        }
    );
    assert_eq!(parsed.to_string(), example);
    let row = "a red circle, a blue star and a large white ring from top to bottom on a dotted black background";
    assert_eq!(Description::parse(row).unwrap().layout, Layout::Column);
    assert_eq!(Description::parse(row).unwrap().to_string(), row);
    assert_eq!(
        Description::parse("a plain green background")
            .unwrap()
            .to_string(),
        "a green background"
    );
    let two = "a red circle and a blue square from left to right on a yellow background";
    assert_eq!(Description::parse(two).unwrap().layout, Layout::Row);
    assert_eq!(Description::parse(two).unwrap().to_string(), two);
}

#[test]
fn parser_errors_name_the_unexpected_word() {
    let cases = [
        (
            "a red circle on a yellow",
            "expected `background` after \"a red circle on a yellow\", found `the end`",
        ),
        (
            "a red cube on a yellow background",
            "expected a shape after \"a red\", found `cube`",
        ),
        (
            "a red circle near a blue square on a yellow background",
            "found `near`",
        ),
        (
            "a red background today",
            "expected the end of the caption after \"a red background\", found `today`",
        ),
    ];
    for (caption, message) in cases {
        let error = Description::parse(caption).unwrap_err().to_string();
        assert!(error.contains(message), "{caption}: {error}");
    }
}

#[test]
fn edits_change_only_their_region() {
    let world = world();
    let mut kinds = BTreeSet::new();
    for index in 0..150 {
        let s = world.edit_sample(index);
        let (mut inside_changed, mut outside_changed) = (0, 0);
        for (x, y, m) in s.region.enumerate_pixels() {
            let changed = s.before.get_pixel(x, y) != s.after.get_pixel(x, y);
            if m.0[0] == 0 {
                outside_changed += changed as u32;
            } else {
                inside_changed += changed as u32;
            }
        }
        assert_eq!(outside_changed, 0, "{:?}", s.edit);
        // The least change, a small circle into a ring, opens a hole of about 25 pixels.
        assert!(
            inside_changed >= 15,
            "{:?}: {inside_changed} pixels changed",
            s.edit
        );

        // The prompt states exactly the asked change.
        let (before, after) = (
            Description::parse(&s.caption).unwrap(),
            Description::parse(&s.prompt).unwrap(),
        );
        let kind = match &s.edit {
            Edit::ColourChange { object, to } => {
                let old = s.scene.objects[*object].desc;
                let i = before.objects.iter().position(|d| *d == old).unwrap();
                assert_eq!(after.objects[i], ObjectDesc { colour: *to, ..old });
                "colour"
            }
            Edit::ShapeChange { object, to } => {
                let old = s.scene.objects[*object].desc;
                let i = before.objects.iter().position(|d| *d == old).unwrap();
                assert_eq!(after.objects[i], ObjectDesc { shape: *to, ..old });
                "shape"
            }
            Edit::AddObject(object) => {
                assert_eq!(after.objects.len(), before.objects.len() + 1);
                assert!(after.objects.contains(&object.desc));
                "add"
            }
            Edit::RemoveObject { object } => {
                assert_eq!(after.objects.len(), before.objects.len() - 1);
                assert!(!after.objects.contains(&s.scene.objects[*object].desc));
                "remove"
            }
            Edit::BackgroundChange(background) => {
                assert_eq!(
                    (after.background, &after.objects),
                    (*background, &before.objects)
                );
                "background"
            }
        };
        if kind != "add" && kind != "remove" {
            assert_eq!(after.objects.len(), before.objects.len());
        }
        kinds.insert(kind);
    }
    assert_eq!(kinds.len(), 5, "{kinds:?}");
}

#[test]
fn instructions_name_the_change() {
    let scene = Scene {
        background: Background {
            colour: Colour::Yellow,
            pattern: Pattern::Plain,
        },
        objects: vec![
            Object {
                desc: ObjectDesc {
                    size: Size::Small,
                    colour: Colour::Red,
                    shape: Shape::Circle,
                },
                x: 0.25,
                y: 0.5,
            },
            Object {
                desc: ObjectDesc {
                    size: Size::Medium,
                    colour: Colour::Blue,
                    shape: Shape::Square,
                },
                x: 0.75,
                y: 0.55,
            },
        ],
    };
    assert_eq!(
        scene.caption(),
        "a small red circle left of a blue square on a yellow background"
    );
    let orange = Edit::ColourChange {
        object: 1,
        to: Colour::Orange,
    };
    assert_eq!(
        orange.instruction(&scene).unwrap(),
        "make the blue square orange"
    );
    assert_eq!(
        orange.prompt(&scene).unwrap(),
        "a small red circle left of an orange square on a yellow background"
    );
    let star = Edit::ShapeChange {
        object: 0,
        to: Shape::Star,
    };
    assert_eq!(
        star.instruction(&scene).unwrap(),
        "turn the red circle into a star"
    );
    assert_eq!(
        Edit::RemoveObject { object: 0 }.prompt(&scene).unwrap(),
        "a blue square on a yellow background"
    );
    let dotted = Edit::BackgroundChange(Background {
        colour: Colour::Green,
        pattern: Pattern::Dotted,
    });
    assert_eq!(
        dotted.instruction(&scene).unwrap(),
        "make the background dotted green"
    );

    // Refused: a missing object, no change, a colour the background has, a duplicate, overlap.
    let refused = [
        Edit::RemoveObject { object: 2 },
        Edit::ColourChange {
            object: 0,
            to: Colour::Red,
        },
        Edit::ColourChange {
            object: 0,
            to: Colour::Yellow,
        },
        Edit::ShapeChange {
            object: 1,
            to: Shape::Square,
        },
        Edit::AddObject(Object {
            desc: ObjectDesc {
                size: Size::Small,
                colour: Colour::Green,
                shape: Shape::Triangle,
            },
            x: 0.3,
            y: 0.5,
        }),
    ];
    let blue_circle = Scene {
        objects: vec![
            scene.objects[0],
            Object {
                desc: ObjectDesc {
                    shape: Shape::Circle,
                    ..scene.objects[1].desc
                },
                ..scene.objects[1]
            },
        ],
        ..scene.clone()
    };
    assert!(blue_circle
        .apply(&Edit::ColourChange {
            object: 1,
            to: Colour::Red
        })
        .is_err());
    for edit in refused {
        assert!(scene.apply(&edit).is_err(), "{edit:?}");
    }
    assert_eq!(
        scene
            .object_mask(2, &SceneConfig::default())
            .unwrap_err()
            .to_string(),
        "invalid object: index 2 out of range: the scene has 2 objects"
    );
}

#[test]
fn wider_images_show_the_same_scene_in_the_middle() {
    let scene = world().scene(5);
    let square = scene.render(&SceneConfig::default());
    let wide = scene.render(&SceneConfig {
        width: 96,
        ..SceneConfig::default()
    });
    let middle = image::imageops::crop_imm(&wide, 16, 0, 64, 64).to_image();
    assert_eq!(middle, square);
    assert!(World::new(
        SceneConfig {
            max_objects: 4,
            ..SceneConfig::default()
        },
        0
    )
    .is_err());
    assert!(World::new(
        SceneConfig {
            width: 0,
            ..SceneConfig::default()
        },
        0
    )
    .is_err());
}

/// The words of a caption or instruction, the comma as its own word.
fn words(text: &str) -> Vec<String> {
    text.replace(',', " , ")
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
fn vocabulary_is_exactly_the_words_used() {
    let world = world();
    let mut used = BTreeSet::new();
    for index in 0..400 {
        let (scene, edit) = world.edit(index);
        let texts = [
            scene.caption(),
            edit.prompt(&scene).unwrap(),
            edit.instruction(&scene).unwrap(),
        ];
        used.extend(texts.iter().flat_map(|t| words(t)));
    }
    let vocabulary: BTreeSet<String> = vocabulary().into_iter().collect();
    assert_eq!(vocabulary.len(), super::vocabulary().len(), "no duplicates");
    assert_eq!(used, vocabulary);
}

#[test]
fn every_grammar_word_is_one_token() {
    let dir = std::env::temp_dir().join(format!("unitune-world-tokenizer-{}", std::process::id()));
    write_tokenizer_files(&dir).unwrap();
    let tokenizer = ClipTokenizer::from_dir(&dir).unwrap();
    for word in vocabulary() {
        assert_eq!(tokenizer.tokenize(&word), [format!("{word}</w>")], "{word}");
    }
    let caption = world().sample(0).2;
    assert_eq!(
        tokenizer.tokenize(&caption).len(),
        words(&caption).len(),
        "{caption}"
    );
    let encoding = tokenizer.encode(&caption);
    assert_eq!(encoding.ids.len(), 77);
    assert_eq!(tokenizer.pad_id(), tokenizer.eos_id());
    assert_eq!(
        tokenizer.decode(&encoding.ids[1..=words(&caption).len()]),
        caption.replace(',', " ,")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_configs_and_scenes_are_refused() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let config = SceneConfig::default();
    for bad in [
        SceneConfig {
            max_objects: 0,
            ..config.clone()
        },
        SceneConfig {
            max_objects: 4,
            ..config.clone()
        },
        SceneConfig {
            supersample: 0,
            ..config.clone()
        },
        SceneConfig {
            height: 0,
            ..config.clone()
        },
    ] {
        assert!(Scene::random(&mut rng, &bad).is_err(), "{bad:?}");
        assert!(World::new(bad, 0).is_err());
    }
    let mut scene = world().scene(1);
    scene.objects.push(Object {
        x: scene.objects[0].x + 0.01,
        ..scene.objects[0]
    });
    let error = scene
        .random_edit(&mut rng, &config)
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("invalid scene: "), "{error}");
}
