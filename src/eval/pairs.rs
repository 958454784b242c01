//! The standard LFW pairs file (`pairs.txt`, View 2 format).
//!
//! ```text
//! 2<TAB>300                      folds, pairs of each kind per fold
//! Abel_Pacheco<TAB>1<TAB>4       n matched lines: name, image i, image j
//! ...
//! Abdel_Madi_Shabneh<TAB>1<TAB>Dean_Barker<TAB>1   n mismatched lines
//! ...                            then the next fold
//! ```
//!
//! The View 1 files (`pairsDevTrain.txt`) have a one-number header (`1100`):
//! that is read as a single fold. Blank lines are ignored; fields may be
//! separated by any whitespace (LFW names never contain any).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    pub name: String,
    /// 1-based, as in the file names.
    pub number: u32,
}

impl ImageRef {
    /// `<root>/<name>/<name>_<number:04>.jpg`
    pub fn path(&self, root: &Path) -> PathBuf {
        root.join(&self.name)
            .join(format!("{}_{:04}.jpg", self.name, self.number))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub a: ImageRef,
    pub b: ImageRef,
    /// Both images show the same person (a "matched" line).
    pub same: bool,
    /// 0-based fold index.
    pub fold: usize,
    /// 1-based line in the file, for messages.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairsFile {
    pub folds: usize,
    /// Matched pairs per fold (and as many mismatched).
    pub per_fold: usize,
    /// In file order: fold by fold, matched before mismatched.
    pub pairs: Vec<Pair>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairsError {
    #[error("the pairs file is empty")]
    Empty,
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error(
        "the file ends after {found} pairs, but its header promises {expected} \
         ({folds} folds x {per_fold} matched + {per_fold} mismatched)"
    )]
    Truncated {
        found: usize,
        expected: usize,
        folds: usize,
        per_fold: usize,
    },
}

/// Header values beyond this are certainly not a pairs file (and would make
/// `folds * per_fold` allocations absurd).
const MAX_PAIRS: usize = 10_000_000;

fn line_err(line: usize, message: impl Into<String>) -> PairsError {
    PairsError::Line {
        line,
        message: message.into(),
    }
}

fn positive(field: &str, what: &str, line: usize) -> Result<usize, PairsError> {
    match field.parse::<usize>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(line_err(
            line,
            format!("{what} must be a positive integer, found {field:?}"),
        )),
    }
}

fn image_number(field: &str, line: usize) -> Result<u32, PairsError> {
    match field.parse::<u32>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(line_err(
            line,
            format!("image number must be a positive integer, found {field:?}"),
        )),
    }
}

/// A name becomes a folder and file name: nothing that could leave the
/// images folder or name a different file.
fn person(field: &str, line: usize) -> Result<String, PairsError> {
    let bad = field == "."
        || field == ".."
        || field
            .chars()
            .any(|c| c == '/' || c == '\\' || c == '\0' || c.is_control());
    if bad {
        return Err(line_err(
            line,
            format!("{field:?} is not a valid person name (no path separators or dot names)"),
        ));
    }
    Ok(field.to_owned())
}

pub fn parse(text: &str) -> Result<PairsFile, PairsError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty());

    let (hline, header) = lines.next().ok_or(PairsError::Empty)?;
    let hfields: Vec<&str> = header.split_whitespace().collect();
    let (folds, per_fold) = match hfields.as_slice() {
        [n] => (1, positive(n, "pairs per fold", hline)?),
        [f, n] => (
            positive(f, "number of folds", hline)?,
            positive(n, "pairs per fold", hline)?,
        ),
        _ => {
            return Err(line_err(
                hline,
                format!(
                    "expected the header `folds<TAB>pairs_per_fold`, found {} fields",
                    hfields.len()
                ),
            ))
        }
    };
    let expected = folds
        .checked_mul(per_fold)
        .and_then(|x| x.checked_mul(2))
        .filter(|&x| x <= MAX_PAIRS)
        .ok_or_else(|| {
            line_err(
                hline,
                format!("header promises too many pairs ({folds} x 2 x {per_fold})"),
            )
        })?;

    let mut pairs = Vec::with_capacity(expected);
    for (line, content) in lines {
        let index = pairs.len();
        if index == expected {
            return Err(line_err(
                line,
                format!(
                    "extra line after the {expected} pairs the header promises \
                     ({folds} folds x {per_fold} matched + {per_fold} mismatched)"
                ),
            ));
        }
        let fold = index / (2 * per_fold);
        let within = index % (2 * per_fold);
        let same = within < per_fold;
        let f: Vec<&str> = content.split_whitespace().collect();
        let pair = if same {
            let [name, i, j] = f.as_slice() else {
                return Err(line_err(
                    line,
                    format!(
                        "expected a matched pair `name<TAB>i<TAB>j` (fold {}, matched pair {} \
                         of {per_fold}), found {} fields",
                        fold + 1,
                        within + 1,
                        f.len()
                    ),
                ));
            };
            let name = person(name, line)?;
            let (i, j) = (image_number(i, line)?, image_number(j, line)?);
            if i == j {
                return Err(line_err(
                    line,
                    format!("matched pair uses the same image twice ({name} {i})"),
                ));
            }
            Pair {
                a: ImageRef {
                    name: name.clone(),
                    number: i,
                },
                b: ImageRef { name, number: j },
                same,
                fold,
                line,
            }
        } else {
            let [n1, i, n2, j] = f.as_slice() else {
                return Err(line_err(
                    line,
                    format!(
                        "expected a mismatched pair `name1<TAB>i<TAB>name2<TAB>j` (fold {}, \
                         mismatched pair {} of {per_fold}), found {} fields",
                        fold + 1,
                        within - per_fold + 1,
                        f.len()
                    ),
                ));
            };
            let (n1, n2) = (person(n1, line)?, person(n2, line)?);
            if n1 == n2 {
                return Err(line_err(
                    line,
                    format!("mismatched pair names the same person twice ({n1})"),
                ));
            }
            Pair {
                a: ImageRef {
                    name: n1,
                    number: image_number(i, line)?,
                },
                b: ImageRef {
                    name: n2,
                    number: image_number(j, line)?,
                },
                same,
                fold,
                line,
            }
        };
        pairs.push(pair);
    }
    if pairs.len() != expected {
        return Err(PairsError::Truncated {
            found: pairs.len(),
            expected,
            folds,
            per_fold,
        });
    }
    Ok(PairsFile {
        folds,
        per_fold,
        pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "2\t2\n\
        Alice\t1\t2\n\
        Bob\t3\t1\n\
        Alice\t1\tBob\t2\n\
        Carol\t4\tDave\t10\n\
        Erin\t1\t2\n\
        Erin\t2\t3\n\
        Frank\t1\tGrace\t1\n\
        Grace\t2\tErin\t1\n";

    fn err_line(text: &str) -> (usize, String) {
        match parse(text) {
            Err(PairsError::Line { line, message }) => (line, message),
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn parses_folds_labels_and_paths() {
        let p = parse(GOOD).unwrap();
        assert_eq!((p.folds, p.per_fold, p.pairs.len()), (2, 2, 8));
        let labels: Vec<(bool, usize)> = p.pairs.iter().map(|x| (x.same, x.fold)).collect();
        assert_eq!(
            labels,
            vec![
                (true, 0),
                (true, 0),
                (false, 0),
                (false, 0),
                (true, 1),
                (true, 1),
                (false, 1),
                (false, 1)
            ]
        );
        let third = &p.pairs[3];
        assert_eq!(third.line, 5);
        assert_eq!(third.a.name, "Carol");
        assert_eq!(
            third.b.path(Path::new("/data")),
            PathBuf::from("/data/Dave/Dave_0010.jpg")
        );
        assert_eq!(p.pairs[1].a.number, 3);
        assert_eq!(p.pairs[1].b.number, 1);
    }

    #[test]
    fn accepts_crlf_spaces_blank_lines_and_one_number_header() {
        let text = "1 1\r\n\r\nAlice 1 2\r\nAlice  1 Bob 2\r\n\n";
        let p = parse(text).unwrap();
        assert_eq!(p.pairs.len(), 2);
        assert_eq!(p.pairs[1].line, 4);
        let v1 = parse("1\nAlice\t1\t2\nAlice\t1\tBob\t1\n").unwrap();
        assert_eq!((v1.folds, v1.per_fold), (1, 1));
    }

    #[test]
    fn header_errors() {
        assert_eq!(parse(""), Err(PairsError::Empty));
        assert_eq!(parse("\n \n"), Err(PairsError::Empty));
        let (line, msg) = err_line("2\tx\n");
        assert_eq!(line, 1);
        assert!(
            msg.contains("pairs per fold") && msg.contains("\"x\""),
            "{msg}"
        );
        let (_, msg) = err_line("0\t3\n");
        assert!(msg.contains("number of folds"), "{msg}");
        let (_, msg) = err_line("1\t2\t3\n");
        assert!(msg.contains("header"), "{msg}");
        let (_, msg) = err_line("100000\t100000\n");
        assert!(msg.contains("too many"), "{msg}");
    }

    #[test]
    fn wrong_field_counts_name_the_line_and_kind() {
        // Third pair line (line 4) should be mismatched but has 3 fields.
        let text = "1\t2\nA\t1\t2\nB\t1\t2\nC\t1\t2\nD\t1\tE\t1\n";
        let (line, msg) = err_line(text);
        assert_eq!(line, 4);
        assert!(msg.contains("mismatched pair 1 of 2"), "{msg}");
        // A 4-field line where a matched one belongs.
        let (line, msg) = err_line("1\t1\nA\t1\tB\t2\nA\t1\tB\t2\n");
        assert_eq!(line, 2);
        assert!(msg.contains("expected a matched pair"), "{msg}");
    }

    #[test]
    fn bad_values_are_reported_with_line_numbers() {
        let (line, msg) = err_line("1\t1\nA\t1\t0\nA\t1\tB\t2\n");
        assert_eq!(line, 2);
        assert!(msg.contains("image number"), "{msg}");
        let (line, _) = err_line("1\t1\nA\t1\t2\nA\t-1\tB\t2\n");
        assert_eq!(line, 3);
        let (_, msg) = err_line("1\t1\nA\t2\t2\nA\t1\tB\t2\n");
        assert!(msg.contains("same image twice"), "{msg}");
        let (line, msg) = err_line("1\t1\nA\t1\t2\nA\t1\tA\t2\n");
        assert_eq!(line, 3);
        assert!(msg.contains("same person"), "{msg}");
        let (_, msg) = err_line("1\t1\n..\t1\t2\nA\t1\tB\t2\n");
        assert!(msg.contains("not a valid person name"), "{msg}");
        let (_, msg) = err_line("1\t1\nA\t1\t2\nA\t1\t../etc\t2\n");
        assert!(msg.contains("not a valid person name"), "{msg}");
    }

    #[test]
    fn too_few_and_too_many_lines() {
        assert_eq!(
            parse("2\t1\nA\t1\t2\nA\t1\tB\t2\nC\t1\t2\n"),
            Err(PairsError::Truncated {
                found: 3,
                expected: 4,
                folds: 2,
                per_fold: 1
            })
        );
        let (line, msg) = err_line("1\t1\nA\t1\t2\nA\t1\tB\t2\nC\t1\t2\n");
        assert_eq!(line, 4);
        assert!(msg.contains("extra line"), "{msg}");
    }
}
