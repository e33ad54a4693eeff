//! Static draft-tree templates for Token Recycling.
//!
//! A template is a list of index paths: `[a]` is the `a`-th candidate of the
//! root, `[a, b]` the `b`-th candidate of that token, and so on. The recycler
//! turns it into a [`crate::draft::DraftTree`] by looking each index up in its
//! adjacency matrix. Templates are stored in BFS order (by depth, then
//! lexicographically), so any prefix of a template is itself a valid template.
//!
//! Builtins:
//! - `tr-80`: the paper's default tree (reference code version "2.2.2"):
//!   80 nodes, 8/21/25/15/8/3 per depth 1..=6, indices < 8.
//! - `tr-N` for 1 <= N <= 80 (`tr-4`, `tr-8`, `tr-16`, `tr-32` are the
//!   intended CPU sizes): the N nodes of tr-80 with the highest acceptance
//!   probability under a rank-only model, see [`TreeTemplate::best_of`].

use std::path::Path;

use crate::error::{Error, Result};

/// Largest number of candidates per vocabulary row a template may address
/// (bounds the recycler's matrix: |V| x k x 6 bytes).
pub const MAX_K: usize = 64;
/// Bounds on user-provided templates, so a bad file cannot ask for a
/// gigantic tree.
pub const MAX_NODES: usize = 1024;
pub const MAX_DEPTH: usize = 64;

const TR80_JSON: &str = include_str!("templates/tr-80.json");

/// A validated tree template in BFS order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeTemplate {
    paths: Vec<Vec<usize>>,
    /// Parent of each template node as a *tree* index: 0 = root, `i + 1` =
    /// template node `i`.
    parents: Vec<usize>,
}

impl TreeTemplate {
    /// Validates `paths` (non-empty, indices < [`MAX_K`], no duplicates,
    /// prefix-closed) and sorts them into BFS order.
    pub fn new(mut paths: Vec<Vec<usize>>) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::Draft(
                "a tree template needs at least one path".into(),
            ));
        }
        if paths.len() > MAX_NODES {
            return Err(Error::Draft(format!(
                "a tree template holds at most {MAX_NODES} paths, this one has {}",
                paths.len()
            )));
        }
        for (i, p) in paths.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::Draft(format!(
                    "template path {i} is empty (the root is implicit)"
                )));
            }
            if p.len() > MAX_DEPTH {
                return Err(Error::Draft(format!(
                    "template path {i} is {} deep, the limit is {MAX_DEPTH}",
                    p.len()
                )));
            }
            if let Some(&bad) = p.iter().find(|&&x| x >= MAX_K) {
                return Err(Error::Draft(format!(
                    "template path {i} {p:?} uses candidate index {bad}, the limit is {}",
                    MAX_K - 1
                )));
            }
        }
        paths.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
        if let Some(w) = paths.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Draft(format!(
                "template path {:?} appears more than once",
                w[0]
            )));
        }
        let mut parents = Vec::with_capacity(paths.len());
        for p in &paths {
            let parent = if p.len() == 1 {
                0
            } else {
                let prefix = &p[..p.len() - 1];
                // Sorted by (len, lex): binary search among all paths.
                let pos = paths
                    .binary_search_by(|q| {
                        q.len()
                            .cmp(&prefix.len())
                            .then_with(|| q.as_slice().cmp(prefix))
                    })
                    .map_err(|_| {
                        Error::Draft(format!(
                            "template is not prefix-closed: {p:?} has no parent {prefix:?}"
                        ))
                    })?;
                pos + 1
            };
            parents.push(parent);
        }
        Ok(TreeTemplate { paths, parents })
    }

    /// Parses JSON: either a bare list of paths (`[[0],[1],[0,0]]`) or an
    /// object with a `paths` field holding that list.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Draft(format!("tree template is not valid JSON: {e}")))?;
        let list = match &value {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(o) => match o.get("paths") {
                Some(serde_json::Value::Array(a)) => a,
                _ => {
                    return Err(Error::Draft(
                        "tree template object needs a \"paths\" list".into(),
                    ))
                }
            },
            _ => {
                return Err(Error::Draft(
                    "tree template must be a list of paths like [[0],[1],[0,0]]".into(),
                ))
            }
        };
        let mut paths = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let bad = || {
                Error::Draft(format!(
                    "template path {i} ({item}) is not a list of non-negative integers"
                ))
            };
            let arr = item.as_array().ok_or_else(bad)?;
            let path = arr
                .iter()
                .map(|x| x.as_u64().map(|v| v.min(usize::MAX as u64) as usize))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(bad)?;
            paths.push(path);
        }
        Self::new(paths)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Draft(format!("tree template {}: {e}", path.display())))?;
        Self::from_json(&text)
            .map_err(|e| Error::Draft(format!("tree template {}: {e}", path.display())))
    }

    /// A builtin template by name (`tr-80`, or `tr-N` for 1 <= N <= 80).
    pub fn builtin(name: &str) -> Option<Self> {
        let n: usize = name.strip_prefix("tr-")?.parse().ok()?;
        let tr80 = Self::from_json(TR80_JSON).expect("builtin tr-80 template is valid");
        if n == 0 || n > tr80.len() {
            return None;
        }
        Some(tr80.best_of(n))
    }

    /// A builtin name, else a JSON file path.
    pub fn from_name_or_file(s: &str) -> Result<Self> {
        if let Some(t) = Self::builtin(s) {
            return Ok(t);
        }
        let path = Path::new(s);
        if path.is_file() {
            return Self::from_file(path);
        }
        Err(Error::Draft(format!(
            "unknown tree template '{s}': neither a builtin (tr-4, tr-8, tr-16, tr-32, tr-80, \
             or tr-N with 1 <= N <= 80) nor an existing JSON file"
        )))
    }

    /// The `n` nodes with the highest estimated acceptance probability
    /// (all of them if `n >= len`), in BFS order. Always prefix-closed.
    ///
    /// How the small CPU templates are derived: a node is accepted only if
    /// every candidate on its path is, and a rank-`r` candidate is modelled as
    /// correct with probability `p(r) = 0.5 / (r + 1)^1.5`, independently of
    /// depth. This Zipf-like curve was picked among `a / (r+1)^b` and
    /// `a * b^r` curves as the one whose own best 80-node tree over k = 8
    /// (depth <= 6) overlaps tr-80 the most (70 of 80 nodes), with
    /// sum_r p(r) = 0.96 <= 1 so it is a proper distribution. So the small
    /// trees are "what the paper's tree would keep if it had to shrink",
    /// not fitted to any dataset of ours. The path score
    /// `prod 0.5 / (r+1)^1.5` orders like `4^depth * prod (r+1)^3`
    /// (smaller = better), which we compare exactly in integers; ties go
    /// to BFS order, so a parent (strictly better score) is always kept
    /// before its children.
    pub fn best_of(&self, n: usize) -> Self {
        let cost = |p: &[usize]| -> u128 {
            p.iter().fold(1u128, |acc, &r| {
                let c = (r as u128) + 1;
                acc.saturating_mul(4).saturating_mul(c * c * c)
            })
        };
        let mut order: Vec<usize> = (0..self.paths.len()).collect();
        // Stable sort keeps BFS order among equal costs.
        order.sort_by_key(|&i| cost(&self.paths[i]));
        order.truncate(n);
        let paths = order.iter().map(|&i| self.paths[i].clone()).collect();
        Self::new(paths).expect("a best-first subset of a valid template is valid")
    }

    /// The first `n` nodes in BFS order.
    pub fn truncated(&self, n: usize) -> Self {
        let n = n.min(self.paths.len());
        TreeTemplate {
            paths: self.paths[..n].to_vec(),
            parents: self.parents[..n].to_vec(),
        }
    }

    /// The nodes whose indices are all below `k` (still prefix-closed), or
    /// `None` if none are.
    pub fn limited_to_k(&self, k: usize) -> Option<Self> {
        let paths: Vec<Vec<usize>> = self
            .paths
            .iter()
            .filter(|p| p.iter().all(|&x| x < k))
            .cloned()
            .collect();
        (!paths.is_empty()).then(|| Self::new(paths).expect("a k-limited template is valid"))
    }

    /// Checks that every index fits a recycler storing `k` candidates per row.
    pub fn check_k(&self, k: usize) -> Result<()> {
        if self.k_needed() > k {
            let bad = self
                .paths
                .iter()
                .find(|p| p.iter().any(|&x| x >= k))
                .cloned()
                .unwrap_or_default();
            return Err(Error::Draft(format!(
                "tree template path {bad:?} needs candidate index {} but only k = {k} \
                 candidates are stored per token",
                self.max_index()
            )));
        }
        Ok(())
    }

    /// Number of template nodes (the tree has one more: the root).
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn paths(&self) -> &[Vec<usize>] {
        &self.paths
    }

    /// Tree index of template node `i`'s parent (0 = root).
    pub fn parent(&self, i: usize) -> usize {
        self.parents[i]
    }

    /// Candidate index (rank in the parent's row) of template node `i`.
    pub fn rank(&self, i: usize) -> usize {
        *self.paths[i].last().expect("paths are non-empty")
    }

    pub fn depth(&self, i: usize) -> usize {
        self.paths[i].len()
    }

    pub fn max_depth(&self) -> usize {
        self.paths.last().map_or(0, Vec::len)
    }

    /// Largest candidate index used.
    pub fn max_index(&self) -> usize {
        self.paths.iter().flatten().copied().max().unwrap_or(0)
    }

    /// Candidates per row a recycler needs for this template.
    pub fn k_needed(&self) -> usize {
        self.max_index() + 1
    }

    /// Nodes per depth, depth 1 first.
    pub fn depth_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.max_depth()];
        for p in &self.paths {
            counts[p.len() - 1] += 1;
        }
        counts
    }

    /// JSON text that [`TreeTemplate::from_json`] reads back.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.paths).expect("paths serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(t: &TreeTemplate) -> Vec<Vec<usize>> {
        t.paths().to_vec()
    }

    #[test]
    fn parses_and_sorts_into_bfs() {
        let t = TreeTemplate::from_json("[[0,0],[1],[0],[0,1],[1,0],[0,0,0]]").unwrap();
        assert_eq!(
            paths(&t),
            vec![
                vec![0],
                vec![1],
                vec![0, 0],
                vec![0, 1],
                vec![1, 0],
                vec![0, 0, 0]
            ]
        );
        // Tree indices: root 0, [0]=1, [1]=2, [0,0]=3 ...
        assert_eq!(
            (0..t.len()).map(|i| t.parent(i)).collect::<Vec<_>>(),
            vec![0, 0, 1, 1, 2, 3]
        );
        assert_eq!(t.rank(3), 1);
        assert_eq!(t.max_index(), 1);
        assert_eq!(t.k_needed(), 2);
        assert_eq!(t.depth_counts(), vec![2, 3, 1]);
        let obj = TreeTemplate::from_json(r#"{"name": "x", "paths": [[1],[0]]}"#).unwrap();
        assert_eq!(paths(&obj), vec![vec![0], vec![1]]);
        assert_eq!(TreeTemplate::from_json(&t.to_json()).unwrap(), t);
    }

    #[test]
    fn rejects_bad_templates() {
        let err = |s: &str| match TreeTemplate::from_json(s) {
            Err(Error::Draft(m)) => m,
            other => panic!("{s}: expected a draft error, got {other:?}"),
        };
        assert!(err("not json").contains("not valid JSON"));
        assert!(err("[]").contains("at least one path"));
        assert!(err("[[0],[]]").contains("empty"));
        assert!(err("[[0],[-1]]").contains("non-negative"));
        assert!(err("[[0],[1.5]]").contains("non-negative"));
        assert!(err("[[0],\"a\"]").contains("non-negative"));
        assert!(err("{\"p\": 1}").contains("\"paths\""));
        assert!(err("7").contains("list of paths"));
        assert!(err("[[0],[0,1],[0]]").contains("more than once"));
        let m = err("[[0],[1,0]]");
        assert!(m.contains("prefix-closed") && m.contains("[1, 0]"), "{m}");
        assert!(err("[[0],[0,0,0]]").contains("prefix-closed"));
        assert!(err("[[64]]").contains("limit"));
        assert!(err("[[99999999999999999999]]").contains("non-negative"));
    }

    #[test]
    fn index_must_fit_k() {
        let t = TreeTemplate::from_json("[[0],[3],[3,1]]").unwrap();
        assert!(t.check_k(4).is_ok());
        let small = t.limited_to_k(3).unwrap();
        assert_eq!(small.paths(), &[vec![0]]);
        assert!(TreeTemplate::from_json("[[1]]")
            .unwrap()
            .limited_to_k(1)
            .is_none());
        match t.check_k(3) {
            Err(Error::Draft(m)) => assert!(m.contains("k = 3") && m.contains("[3]"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tr80_matches_the_paper() {
        let t = TreeTemplate::builtin("tr-80").unwrap();
        assert_eq!(t.len(), 80);
        assert_eq!(t.depth_counts(), vec![8, 21, 25, 15, 8, 3]);
        assert_eq!(t.k_needed(), 8);
        assert_eq!(t.paths()[0], vec![0]);
        assert_eq!(t.paths()[79], vec![0, 0, 0, 1, 0, 0]);
        // Spot checks against the reference list.
        for p in [
            vec![3, 1],
            vec![0, 7, 0],
            vec![0, 0, 4, 0],
            vec![1, 0, 0, 0, 0],
        ] {
            assert!(t.paths().contains(&p), "{p:?}");
        }
        assert!(!t.paths().contains(&vec![3, 2]));
    }

    #[test]
    fn small_builtins_are_pinned() {
        let p = |s: &str| paths(&TreeTemplate::from_name_or_file(s).unwrap());
        assert_eq!(p("tr-4"), vec![vec![0], vec![1], vec![0, 0], vec![0, 0, 0]]);
        assert_eq!(
            p("tr-8"),
            vec![
                vec![0],
                vec![1],
                vec![2],
                vec![3],
                vec![0, 0],
                vec![0, 1],
                vec![1, 0],
                vec![0, 0, 0]
            ]
        );
        let t16 = TreeTemplate::builtin("tr-16").unwrap();
        assert_eq!(t16.depth_counts(), vec![6, 5, 4, 1]);
        let t32 = TreeTemplate::builtin("tr-32").unwrap();
        assert_eq!(t32.depth_counts(), vec![8, 11, 7, 5, 1]);
        assert_eq!(t32.paths()[31], vec![0, 0, 0, 0, 0]);
        // Every small template is a subset of tr-80 and nested in the larger.
        let t80 = TreeTemplate::builtin("tr-80").unwrap();
        for n in 1..=80 {
            let t = TreeTemplate::builtin(&format!("tr-{n}")).unwrap();
            assert_eq!(t.len(), n);
            assert!(t.paths().iter().all(|q| t80.paths().contains(q)));
            let bigger = TreeTemplate::builtin(&format!("tr-{}", (n + 1).min(80))).unwrap();
            assert!(t.paths().iter().all(|q| bigger.paths().contains(q)));
        }
        assert!(TreeTemplate::builtin("tr-0").is_none());
        assert!(TreeTemplate::builtin("tr-81").is_none());
        assert!(TreeTemplate::from_name_or_file("tr-81").is_err());
        assert!(TreeTemplate::from_name_or_file("/nonexistent/t.json").is_err());
    }

    #[test]
    fn reads_files_and_truncates() {
        let dir = std::env::temp_dir().join(format!("treespec-tpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.json");
        std::fs::write(&f, "[[0],[1],[0,0]]").unwrap();
        let t = TreeTemplate::from_name_or_file(f.to_str().unwrap()).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(paths(&t.truncated(2)), vec![vec![0], vec![1]]);
        std::fs::write(&f, "[[0],[1,0]]").unwrap();
        let m = TreeTemplate::from_file(&f).unwrap_err().to_string();
        assert!(m.contains("t.json") && m.contains("prefix-closed"), "{m}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
