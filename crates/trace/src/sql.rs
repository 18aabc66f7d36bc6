//! Reading gold SQL with sqlparser: the clauses of a query, its aliases,
//! and the column each identifier names.

use std::collections::HashMap;

use sqlparser::ast::{
    Expr, GroupByExpr, Join, JoinConstraint, JoinOperator, Query, Select, SetExpr, Statement, TableFactor,
    TableWithJoins,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;
use tabletrace_data::Database;

/// Parses one SQL statement that is a query.
pub fn parse_query(sql: &str) -> Result<Query, String> {
    let mut stmts = Parser::parse_sql(&SQLiteDialect {}, sql).map_err(|e| format!("the SQL does not parse: {e}"))?;
    match (stmts.len(), stmts.pop()) {
        (1, Some(Statement::Query(q))) => Ok(*q),
        (1, Some(other)) => Err(format!("not a query: {}", first_word(&other.to_string()))),
        (n, _) => Err(format!("expected one statement, found {n}")),
    }
}

fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

/// A table in a FROM clause: its name and the alias the SQL uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableUse {
    /// The table's name as written.
    pub name: String,
    /// Its alias, if any.
    pub alias: Option<String>,
}

impl TableUse {
    /// The name the SQL refers to it by.
    pub fn handle(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.name)
    }
}

/// The tables of a FROM clause, in order.
pub fn tables_of(from: &[TableWithJoins]) -> Vec<TableUse> {
    let mut out = Vec::new();
    for twj in from {
        for factor in std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation)) {
            if let TableFactor::Table { name, alias, .. } = factor {
                out.push(TableUse { name: name.to_string(), alias: alias.as_ref().map(|a| a.name.value.clone()) });
            }
        }
    }
    out
}

/// The constraint of the join kinds that have one (`&` or `&mut`, by match ergonomics).
macro_rules! join_constraint {
    ($op:expr) => {
        match $op {
            JoinOperator::Join(c)
            | JoinOperator::Inner(c)
            | JoinOperator::Left(c)
            | JoinOperator::LeftOuter(c)
            | JoinOperator::Right(c)
            | JoinOperator::RightOuter(c)
            | JoinOperator::FullOuter(c) => Some(c),
            _ => None,
        }
    };
}

/// The ON condition of a join, if it has one.
pub fn join_condition(join: &Join) -> Option<&Expr> {
    match join_constraint!(&join.join_operator)? {
        JoinConstraint::On(e) => Some(e),
        _ => None,
    }
}

/// Mutable access to a join's ON condition.
pub fn join_condition_mut(join: &mut Join) -> Option<&mut Expr> {
    match join_constraint!(&mut join.join_operator)? {
        JoinConstraint::On(e) => Some(e),
        _ => None,
    }
}

/// Splits `a AND b AND c` into its conjuncts.
pub fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryOp { left, op: sqlparser::ast::BinaryOperator::And, right } => {
            let mut v = conjuncts(left);
            v.extend(conjuncts(right));
            v
        }
        Expr::Nested(inner) if matches!(**inner, Expr::BinaryOp { op: sqlparser::ast::BinaryOperator::And, .. }) => {
            conjuncts(inner)
        }
        other => vec![other],
    }
}

/// The GROUP BY expressions.
pub fn group_by(sel: &Select) -> Vec<&Expr> {
    match &sel.group_by {
        GroupByExpr::Expressions(exprs, _) => exprs.iter().collect(),
        GroupByExpr::All(_) => Vec::new(),
    }
}

/// The single SELECT of a query whose body is one (possibly parenthesised) SELECT.
pub fn single_select(q: &Query) -> Option<&Select> {
    match q.body.as_ref() {
        SetExpr::Select(s) => Some(s),
        SetExpr::Query(inner) if inner.order_by.is_none() && inner.limit_clause.is_none() => single_select(inner),
        _ => None,
    }
}

/// Mutable access to the single SELECT of a query.
pub fn single_select_mut(q: &mut Query) -> Option<&mut Select> {
    match q.body.as_mut() {
        SetExpr::Select(s) => Some(s),
        _ => None,
    }
}

/// Resolves column references (`d.Name`, `Name`) to `(table, column)`
/// using the query's aliases and the tables' schemas.
pub struct Resolver<'a> {
    schema: &'a Database,
    by_handle: HashMap<String, String>,
    tables: Vec<String>,
}

impl<'a> Resolver<'a> {
    /// A resolver for the tables of one FROM clause.
    pub fn new(schema: &'a Database, uses: &[TableUse]) -> Self {
        let mut by_handle = HashMap::new();
        let mut tables = Vec::new();
        for u in uses {
            let real = schema.table(&u.name).map(|t| t.name.clone()).unwrap_or_else(|| u.name.clone());
            by_handle.insert(u.handle().to_lowercase(), real.clone());
            by_handle.insert(u.name.to_lowercase(), real.clone());
            tables.push(real);
        }
        Resolver { schema, by_handle, tables }
    }

    /// `(table, column)` for an identifier expression, if it names one.
    pub fn column(&self, e: &Expr) -> Option<(String, String)> {
        match e {
            Expr::Identifier(id) => {
                let name = &id.value;
                self.tables.iter().find_map(|t| {
                    let table = self.schema.table(t)?;
                    table.column_index(name).map(|i| (table.name.clone(), table.columns[i].name.clone()))
                })
            }
            Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                let t = self.by_handle.get(&parts[0].value.to_lowercase())?;
                let table = self.schema.table(t)?;
                let i = table.column_index(&parts[1].value)?;
                Some((table.name.clone(), table.columns[i].name.clone()))
            }
            Expr::Nested(inner) => self.column(inner),
            _ => None,
        }
    }

    /// Rewrites `alias.` prefixes in SQL text to the table's name, for
    /// readable traces (`d.Name` becomes `department.Name`).
    pub fn readable(&self, sql: &str) -> String {
        let mut out = sql.to_string();
        for (handle, table) in &self.by_handle {
            if handle.eq_ignore_ascii_case(table) {
                continue;
            }
            out = replace_prefix(&out, handle, table);
        }
        out
    }
}

/// Replaces `handle.` (case-insensitive, at a word start) with `table.`.
fn replace_prefix(s: &str, handle: &str, table: &str) -> String {
    let lower = s.to_lowercase();
    let pat = format!("{}.", handle.to_lowercase());
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let bytes = s.as_bytes();
    while i < s.len() {
        if lower[i..].starts_with(&pat) && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')) {
            out.push_str(table);
            out.push('.');
            i += pat.len();
        } else {
            let c = s[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits_mmqa_sql() {
        let q = parse_query("SELECT d.Name, SUM(d.Num_Employees) FROM department d JOIN management m ON d.Department_ID = m.department_ID WHERE m.temporary_acting = 'Yes' AND d.Ranking < 10 GROUP BY d.Name ORDER BY SUM(d.Num_Employees) DESC LIMIT 1;").unwrap();
        let sel = single_select(&q).unwrap();
        let uses = tables_of(&sel.from);
        assert_eq!(uses.len(), 2);
        assert_eq!(uses[0], TableUse { name: "department".into(), alias: Some("d".into()) });
        assert_eq!(conjuncts(sel.selection.as_ref().unwrap()).len(), 2);
        assert_eq!(group_by(sel).len(), 1);
        assert!(join_condition(&sel.from[0].joins[0]).is_some());
        assert!(parse_query("DELETE FROM t").unwrap_err().contains("not a query"));
        assert!(parse_query("SELEC x").unwrap_err().contains("does not parse"));
    }

    #[test]
    fn readable_names_replace_aliases_only_at_word_starts() {
        assert_eq!(replace_prefix("T1.name, xT1.a, t1.b", "t1", "singer"), "singer.name, xT1.a, singer.b");
    }
}
