//! The caption grammar, both ways: [`Description`] (what a caption states) to text, and text back
//! to a `Description`, so a benchmark can read which attributes a prompt asks for.
//!
//! ```text
//! caption    := objects " on " background | background
//! objects    := object
//!             | object " " relation " " object
//!             | object (", " object)* " and " object " from left to right"   (or "from top to bottom")
//! object     := article [size " "] colour " " shape          size: small | large (medium unsaid)
//! relation   := "left of" | "right of" | "above" | "below"
//! background := article [pattern " "] colour " background"   pattern: striped | checkered | dotted
//! article    := "a" | "an" (before a vowel)
//! ```

use std::fmt;

use super::scene::{Background, Colour, ObjectDesc, Pattern, Shape, Size};
use unitune::{Error, Result};

/// How the first object stands to the second in a two-object caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    pub fn words(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// No object or one: nothing to relate.
    Alone,
    /// Two objects; the first mentioned stands in this relation to the second.
    Pair(Relation),
    /// Three or more, mentioned from left to right.
    Row,
    /// Three or more, mentioned from top to bottom.
    Column,
}

/// Everything a caption states: the objects in order of mention, their arrangement, the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub objects: Vec<ObjectDesc>,
    pub layout: Layout,
    pub background: Background,
}

/// Words of the grammar that are not attribute names (instructions' words included).
const GRAMMAR_WORDS: [&str; 21] = [
    "a",
    "an",
    "on",
    "background",
    "left",
    "right",
    "of",
    "above",
    "below",
    ",",
    "and",
    "from",
    "to",
    "top",
    "bottom",
    "make",
    "the",
    "turn",
    "into",
    "add",
    "remove",
];

/// Every word (and the comma) that captions and edit instructions can contain, lowercase, each once.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<&str> = GRAMMAR_WORDS.to_vec();
    words.extend(Colour::ALL.map(Colour::name));
    words.extend(Shape::ALL.map(Shape::name));
    words.extend(Size::ALL.into_iter().filter_map(Size::name));
    words.extend(Pattern::ALL.map(Pattern::name));
    words.into_iter().map(String::from).collect()
}

/// "a" or "an", by the next word's first letter.
pub(super) fn with_article(phrase: &str) -> String {
    let article = if phrase.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {phrase}")
}

/// "small red circle", without article.
pub(super) fn object_words(desc: &ObjectDesc) -> String {
    let size = desc
        .size
        .name()
        .map(|s| format!("{s} "))
        .unwrap_or_default();
    format!("{size}{} {}", desc.colour.name(), desc.shape.name())
}

impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let objects: Vec<String> = self
            .objects
            .iter()
            .map(|o| with_article(&object_words(o)))
            .collect();
        let pattern = match self.background.pattern {
            Pattern::Plain => String::new(),
            p => format!("{} ", p.name()),
        };
        let background = with_article(&format!(
            "{pattern}{} background",
            self.background.colour.name()
        ));
        let Some((last, init)) = objects.split_last() else {
            return write!(f, "{background}");
        };
        match (init, self.layout) {
            ([], _) => write!(f, "{last}")?,
            ([first], Layout::Pair(relation)) => write!(f, "{first} {} {last}", relation.words())?,
            _ => {
                let order = if self.layout == Layout::Column {
                    "top to bottom"
                } else {
                    "left to right"
                };
                write!(f, "{} and {last} from {order}", init.join(", "))?
            }
        }
        write!(f, " on {background}")
    }
}

impl Description {
    /// Reads a caption of the grammar above (extra spaces allowed, "plain" accepted). The
    /// description of any scene survives the round trip through its caption.
    pub fn parse(caption: &str) -> Result<Self> {
        let spaced = caption.to_lowercase().replace(',', " , ");
        let mut words = Words {
            words: spaced.split_whitespace().collect(),
            pos: 0,
        };
        if !words.words.contains(&"on") {
            let background = words.background()?;
            words.end()?;
            return Ok(Self {
                objects: Vec::new(),
                layout: Layout::Alone,
                background,
            });
        }
        let mut objects = vec![words.object()?];
        let layout = match words.next("`,`, `and`, a relation or `on`")? {
            "on" => Layout::Alone,
            sep @ ("," | "and") => {
                let mut sep = sep;
                while sep == "," {
                    objects.push(words.object()?);
                    sep = words.next("`,` or `and`")?;
                }
                if sep != "and" {
                    return Err(words.error(sep, "`,` or `and`"));
                }
                objects.push(words.object()?);
                words.expect("from")?;
                let layout = match words.next("`left` or `top`")? {
                    "left" => Layout::Row,
                    "top" => Layout::Column,
                    w => return Err(words.error(w, "`left` or `top`")),
                };
                words.expect("to")?;
                words.expect(if layout == Layout::Row {
                    "right"
                } else {
                    "bottom"
                })?;
                words.expect("on")?;
                layout
            }
            w => {
                let relation = match w {
                    "left" | "right" => {
                        words.expect("of")?;
                        if w == "left" {
                            Relation::LeftOf
                        } else {
                            Relation::RightOf
                        }
                    }
                    "above" => Relation::Above,
                    "below" => Relation::Below,
                    _ => return Err(words.error(w, "`,`, `and`, a relation or `on`")),
                };
                objects.push(words.object()?);
                words.expect("on")?;
                Layout::Pair(relation)
            }
        };
        let background = words.background()?;
        words.end()?;
        Ok(Self {
            objects,
            layout,
            background,
        })
    }
}

/// A cursor over a caption's words for the recursive-descent parser.
struct Words<'a> {
    words: Vec<&'a str>,
    pos: usize,
}

impl<'a> Words<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.words.get(self.pos).copied()
    }

    fn next(&mut self, expected: &str) -> Result<&'a str> {
        let word = self
            .peek()
            .ok_or_else(|| self.error_at(self.pos, "the end", expected))?;
        self.pos += 1;
        Ok(word)
    }

    fn expect(&mut self, word: &str) -> Result<()> {
        let expected = format!("`{word}`");
        match self.next(&expected)? {
            w if w == word => Ok(()),
            w => Err(self.error(w, &expected)),
        }
    }

    /// Takes the next word if `parse` knows it.
    fn optional<T>(&mut self, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
        let value = self.peek().and_then(parse)?;
        self.pos += 1;
        Some(value)
    }

    fn required<T>(&mut self, parse: impl Fn(&str) -> Option<T>, expected: &str) -> Result<T> {
        let word = self.next(expected)?;
        parse(word).ok_or_else(|| self.error(word, expected))
    }

    fn article(&mut self) -> Result<()> {
        match self.next("`a` or `an`")? {
            "a" | "an" => Ok(()),
            w => Err(self.error(w, "`a` or `an`")),
        }
    }

    fn object(&mut self) -> Result<ObjectDesc> {
        self.article()?;
        let size = self.optional(Size::from_name).unwrap_or(Size::Medium);
        let colour = self.required(Colour::from_name, "a colour")?;
        let shape = self.required(Shape::from_name, "a shape")?;
        Ok(ObjectDesc {
            size,
            colour,
            shape,
        })
    }

    fn background(&mut self) -> Result<Background> {
        self.article()?;
        let pattern = self.optional(Pattern::from_name).unwrap_or(Pattern::Plain);
        let colour = self.required(Colour::from_name, "a colour")?;
        self.expect("background")?;
        Ok(Background { colour, pattern })
    }

    fn end(&self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(w) => Err(self.error_at(self.pos, w, "the end of the caption")),
        }
    }

    /// An error for the word just read (`found`), quoting the words before it.
    fn error(&self, found: &str, expected: &str) -> Error {
        self.error_at(self.pos - 1, found, expected)
    }

    fn error_at(&self, at: usize, found: &str, expected: &str) -> Error {
        let before = self.words[..at].join(" ");
        Error::argument(
            "caption",
            format!("expected {expected} after \"{before}\", found `{found}`"),
        )
    }
}
