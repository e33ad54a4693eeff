//! Benchmark prompts in Spec-Bench's JSONL schema
//! (`{"question_id", "category", "turns": [..]}`), the mapping of raw
//! categories onto Spec-Bench's six columns plus code, and prompt selection.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// The eight MT-bench categories Spec-Bench reports as one "conversation" column.
pub const MT_BENCH_CATEGORIES: [&str; 8] = [
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
];

/// Report columns in Spec-Bench's order, then the code benchmark (MBPP).
pub const CATEGORY_ORDER: [&str; 7] = [
    "conversation",
    "translation",
    "summarization",
    "qa",
    "math_reasoning",
    "rag",
    "code",
];

/// Column titles as Spec-Bench prints them.
pub fn category_title(category: &str) -> String {
    match category {
        "conversation" => "Multi-turn Conversation".into(),
        "translation" => "Translation".into(),
        "summarization" => "Summarization".into(),
        "qa" => "Question Answering".into(),
        "math_reasoning" => "Mathematical Reasoning".into(),
        "rag" => "Retrieval-aug. Generation".into(),
        "code" => "Code (MBPP)".into(),
        other => other.to_string(),
    }
}

/// Short column names for plot axes.
pub fn category_short(category: &str) -> String {
    match category {
        "conversation" => "Conversation".into(),
        "translation" => "Translation".into(),
        "summarization" => "Summarization".into(),
        "qa" => "QA".into(),
        "math_reasoning" => "Math".into(),
        "rag" => "RAG".into(),
        "code" => "Code".into(),
        "overall" => "Overall".into(),
        other => other.to_string(),
    }
}

/// The report category of a raw dataset category: the MT-bench ones become
/// `conversation`, MBPP's (`code`, or anything in a dataset named `mbpp`)
/// becomes `code`, the other Spec-Bench ones keep their name, and unknown
/// ones are reported under their own (lower-cased) name.
pub fn category_of(raw: &str, dataset: &str) -> String {
    let raw_l = raw.trim().to_ascii_lowercase();
    if MT_BENCH_CATEGORIES.contains(&raw_l.as_str()) {
        return "conversation".into();
    }
    if raw_l == "code" || raw_l == "mbpp" || dataset.eq_ignore_ascii_case("mbpp") {
        return "code".into();
    }
    raw_l
}

/// Sort key that puts known categories in Spec-Bench's order, others after, by name.
pub fn category_rank(category: &str) -> (usize, String) {
    let i = CATEGORY_ORDER
        .iter()
        .position(|c| *c == category)
        .unwrap_or(CATEGORY_ORDER.len());
    (i, category.to_string())
}

/// One benchmark item: a conversation of one or more user turns.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// The file stem the item came from (`spec_bench`, `mbpp`).
    pub dataset: String,
    /// As in the file (an integer in Spec-Bench, sometimes a string elsewhere).
    pub question_id: serde_json::Value,
    pub raw_category: String,
    pub category: String,
    pub turns: Vec<String>,
}

impl Item {
    /// The question id as text, for matching (integers and strings alike).
    pub fn id_text(&self) -> String {
        id_text(&self.question_id)
    }
}

/// `81` and `"81"` both give `81`.
pub fn id_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Reads a Spec-Bench-schema JSONL file. Errors name the file and line.
pub fn load_items(path: &Path) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Invalid(format!("dataset {}: {e}", path.display())))?;
    let dataset = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    let bad = |line: usize, msg: &str| {
        Error::Invalid(format!("dataset {}:{}: {msg}", path.display(), line + 1))
    };
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(i, &format!("not JSON ({e})")))?;
        if let Some(item) = longbench_item(&v, &dataset) {
            items.push(item);
            continue;
        }
        let question_id = match v.get("question_id") {
            Some(q @ (serde_json::Value::Number(_) | serde_json::Value::String(_))) => q.clone(),
            _ => return Err(bad(i, "missing `question_id` (a number or string)")),
        };
        let raw_category = v
            .get("category")
            .and_then(|c| c.as_str())
            .unwrap_or("uncategorized")
            .to_string();
        let turns: Vec<String> = match v.get("turns").and_then(|t| t.as_array()) {
            Some(a) => a
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(i, "`turns` must hold strings"))?,
            None => return Err(bad(i, "missing `turns` (an array of strings)")),
        };
        if turns.is_empty() || turns.iter().any(|t| t.is_empty()) {
            return Err(bad(i, "`turns` must hold at least one non-empty string"));
        }
        items.push(Item {
            category: category_of(&raw_category, &dataset),
            dataset: dataset.clone(),
            question_id,
            raw_category,
            turns,
        });
    }
    if items.is_empty() {
        return Err(Error::Invalid(format!(
            "dataset {} holds no items",
            path.display()
        )));
    }
    Ok(items)
}

/// A LongBench-style QA line (`{"id", "context", "question"}`, as in
/// `longbench_qa.jsonl`) as one turn: the passages and the question under
/// the instruction that file's own prompts carry (answer from the context,
/// three sentences at most). Not that schema: `None`.
fn longbench_item(v: &serde_json::Value, dataset: &str) -> Option<Item> {
    if v.get("turns").is_some() {
        return None;
    }
    let context = v.get("context")?.as_str()?;
    let question = v.get("question")?.as_str()?;
    let id = v.get("id").or_else(|| v.get("_id"))?;
    let turn = format!(
        "Use the following pieces of retrieved context in the section demarcated by \"```\" \
         to answer the question. If you don't know the answer just say that you don't know. \
         Use three sentences maximum and keep the answer concise.\n\n```\n{context}\n```\n\n\
         Question: {question}"
    );
    Some(Item {
        dataset: dataset.to_string(),
        question_id: id.clone(),
        raw_category: "longbench_qa".into(),
        category: category_of("longbench_qa", dataset),
        turns: vec![turn],
    })
}

/// The first `per_category` items of each (report) category, in file order.
pub fn select(items: Vec<Item>, per_category: Option<usize>) -> Vec<Item> {
    let Some(k) = per_category else {
        return items;
    };
    let mut taken: std::collections::HashMap<String, usize> = Default::default();
    items
        .into_iter()
        .filter(|it| {
            let n = taken.entry(it.category.clone()).or_default();
            *n += 1;
            *n <= k
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longbench_lines_become_one_turn_with_the_passages_and_the_question() {
        let dir = std::env::temp_dir().join(format!("treespec-lb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("longbench_qa.jsonl");
        std::fs::write(
            &path,
            "{\"id\": 3, \"context\": \"Passage 1: Paris is in France.\", \"question\": \"Where is Paris?\"}\n",
        )
        .unwrap();
        let items = load_items(&path).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].id_text(), "3");
        assert_eq!(items[0].turns.len(), 1);
        let t = &items[0].turns[0];
        assert!(
            t.contains("Passage 1: Paris is in France.")
                && t.ends_with("Question: Where is Paris?")
        );
        // Without a question it is neither schema: refused as before.
        std::fs::write(&path, "{\"id\": 3, \"context\": \"x\"}\n").unwrap();
        assert!(load_items(&path).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn ids_compare_as_text() {
        assert_eq!(id_text(&serde_json::json!(81)), "81");
        assert_eq!(id_text(&serde_json::json!("81")), "81");
    }
}
