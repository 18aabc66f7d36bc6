//! Negative traces from the program tracer: one typed perturbation of the
//! gold SQL (or, for arithmetic slips, of a computed number), re-executed and
//! traced the same way. A negative is kept only when its answer differs from
//! gold but is of the same kind: as many values, of the same types.

use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, Ident, LimitClause, ObjectName, Offset, OffsetRows, OrderByKind, OrderBySort, Query,
    SelectItem, Value as SqlValue,
};
use tabletrace_data::matching::exact_match;
use tabletrace_data::{quote_ident, Answer, Database, ErrorType, ResultSet, TableDb, Value};

use crate::program::{answer_line, ProgramTrace, ProgramTracer, StepCache};
use crate::sql::{conjuncts, join_condition_mut, parse_query, single_select, single_select_mut, tables_of, Resolver};

/// A small deterministic generator for choosing perturbation sites.
struct Pick(u64);

impl Pick {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// Whether `result` is a plausible wrong answer for `gold`: same number of
/// rows and columns, the same value types cell by cell, and not equal to
/// gold as a value set.
pub fn same_kind_but_wrong(gold: &ResultSet, result: &ResultSet) -> bool {
    if gold.n_rows != result.n_rows || gold.columns.len() != result.columns.len() || gold.rows.is_empty() {
        return false;
    }
    let kind = |v: &Value| match v {
        Value::Integer(_) | Value::Real(_) => 0,
        Value::Text(_) => 1,
        Value::Null => 2,
        Value::Blob(_) => 3,
    };
    let types_match = gold.rows.iter().zip(&result.rows).all(|(g, r)| g.iter().zip(r).all(|(a, b)| kind(a) == kind(b)));
    types_match && !exact_match(&answer_line(result), &Answer::Table(gold.clone()))
}

/// Makes up to `want` negative traces of distinct error types for one
/// question from its positive trace (whose SQL is the gold SQL), trying the
/// perturbations in an order drawn from `seed`.
pub fn negatives(
    tracer: &ProgramTracer,
    db: &TableDb,
    gold: &ResultSet,
    positive: &ProgramTrace,
    want: usize,
    seed: u64,
    cache: &StepCache,
) -> Vec<ProgramTrace> {
    let Ok(schema) = db.schema() else { return Vec::new() };
    let Ok(query) = parse_query(&positive.sql) else { return Vec::new() };
    let mut pick = Pick(seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut order = ErrorType::ALL.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, pick.next(i + 1));
    }
    let mut out = Vec::new();
    for et in order {
        if out.len() >= want {
            break;
        }
        let made = if et == ErrorType::ArithmeticSlip {
            arithmetic_slip(positive, &mut pick)
        } else {
            // Run each candidate once; trace (many step queries) only one that qualifies.
            perturbed_queries(et, &query, &schema, db, &mut pick).into_iter().find_map(|q| {
                let rs = db.query(&q.to_string(), &tracer.limits).ok()?;
                if !same_kind_but_wrong(gold, &rs) {
                    return None;
                }
                tracer.trace_query(db, &schema, &q, Some(et), cache).ok()
            })
        };
        if let Some(t) = made.filter(|t| same_kind_but_wrong(gold, &t.result)) {
            out.push(t);
        }
    }
    out
}

/// Candidate perturbed queries of one error type (several sites, tried in order).
fn perturbed_queries(et: ErrorType, q: &Query, schema: &Database, db: &TableDb, pick: &mut Pick) -> Vec<Query> {
    let Some(sel) = single_select(q) else {
        return match et {
            ErrorType::ReversedOrder | ErrorType::OffByOneLimit => order_limit(et, q),
            ErrorType::FlippedFilter => flipped_filters(q),
            _ => vec![],
        };
    };
    let uses = tables_of(&sel.from);
    let resolver = Resolver::new(schema, &uses);
    let mut out = Vec::new();
    match et {
        ErrorType::DroppedFilter => {
            let conds: Vec<Expr> =
                sel.selection.as_ref().map(|s| conjuncts(s).into_iter().cloned().collect()).unwrap_or_default();
            for i in 0..conds.len() {
                let mut q2 = q.clone();
                let rest: Vec<Expr> =
                    conds.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, c)| c.clone()).collect();
                single_select_mut(&mut q2).expect("a single select").selection = rest
                    .into_iter()
                    .reduce(|a, b| Expr::BinaryOp { left: Box::new(a), op: BinaryOperator::And, right: Box::new(b) });
                out.push(q2);
            }
        }
        ErrorType::FlippedFilter => out.extend(flipped_filters(q)),
        ErrorType::WrongAggregate => {
            for site in 0..4 {
                let mut q2 = q.clone();
                let mut seen = 0;
                let mut changed = false;
                if let Some(s) = single_select_mut(&mut q2) {
                    for item in &mut s.projection {
                        let (SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. }) = item else {
                            continue;
                        };
                        let _ = sqlparser::ast::visit_expressions_mut(e, |x: &mut Expr| {
                            if let Expr::Function(f) = x {
                                let swap = match f.name.to_string().to_ascii_lowercase().as_str() {
                                    "sum" => Some("AVG"),
                                    "avg" => Some("SUM"),
                                    "max" => Some("MIN"),
                                    "min" => Some("MAX"),
                                    _ => None,
                                };
                                if let Some(new) = swap {
                                    if seen == site && !changed {
                                        f.name = ObjectName::from(vec![Ident::new(new)]);
                                        changed = true;
                                    }
                                    seen += 1;
                                }
                            }
                            ControlFlow::<()>::Continue(())
                        });
                    }
                }
                if !changed {
                    break;
                }
                out.push(q2);
            }
        }
        ErrorType::WrongJoinKey => {
            let n_joins: usize = sel.from.iter().map(|t| t.joins.len()).sum();
            for j in 0..n_joins {
                let mut q2 = q.clone();
                let s = single_select_mut(&mut q2).expect("a single select");
                let Some(join) = s.from.iter_mut().flat_map(|t| t.joins.iter_mut()).nth(j) else { continue };
                let Some(Expr::BinaryOp { right, op: BinaryOperator::Eq, .. }) = join_condition_mut(join) else {
                    continue;
                };
                let Some((table, col)) = resolver.column(right) else { continue };
                let Some(t) = schema.table(&table) else { continue };
                let ty = t.columns[t.column_index(&col).expect("resolved")].ty;
                let mut alts: Vec<&str> = t
                    .columns
                    .iter()
                    .filter(|c| !c.name.eq_ignore_ascii_case(&col) && c.ty == ty)
                    .map(|c| c.name.as_str())
                    .collect();
                // Key-like columns first: a wrong join key looks like a key.
                alts.sort_by_key(|c| !c.to_lowercase().contains("id"));
                if let Some(alt) = alts.first() {
                    replace_column(right, alt);
                    out.push(q2);
                }
            }
        }
        ErrorType::WrongColumn => {
            for (i, item) in sel.projection.iter().enumerate() {
                let SelectItem::UnnamedExpr(e) = item else { continue };
                let Some((table, col)) = resolver.column(e) else { continue };
                let Some(t) = schema.table(&table) else { continue };
                let ty = t.columns[t.column_index(&col).expect("resolved")].ty;
                let alts: Vec<&str> = t
                    .columns
                    .iter()
                    .filter(|c| !c.name.eq_ignore_ascii_case(&col) && c.ty == ty)
                    .map(|c| c.name.as_str())
                    .collect();
                if alts.is_empty() {
                    continue;
                }
                let alt = alts[pick.next(alts.len())];
                let mut q2 = q.clone();
                if let Some(SelectItem::UnnamedExpr(e2)) = single_select_mut(&mut q2).map(|s| &mut s.projection[i]) {
                    replace_column(e2, alt);
                    out.push(q2);
                }
            }
        }
        ErrorType::HallucinatedValue => {
            let conds: Vec<&Expr> = sel.selection.as_ref().map(conjuncts).unwrap_or_default();
            for (ci, c) in conds.iter().enumerate() {
                let Expr::BinaryOp { left, op: BinaryOperator::Eq | BinaryOperator::NotEq, right } = c else {
                    continue;
                };
                let (col_e, lit) = match (left.as_ref(), right.as_ref()) {
                    (col, Expr::Value(v)) | (Expr::Value(v), col) => (col, v.value.clone()),
                    _ => continue,
                };
                let SqlValue::SingleQuotedString(old) = lit else { continue };
                let Some((table, col)) = resolver.column(col_e) else { continue };
                let sql = format!(
                    "SELECT DISTINCT {c} FROM {t} WHERE {c} IS NOT NULL AND {c} <> ?1 ORDER BY {c} LIMIT 20",
                    c = quote_ident(&col),
                    t = quote_ident(&table)
                )
                .replace("?1", &format!("'{}'", old.replace('\'', "''")));
                let Ok(rs) = db.query(&sql, &tabletrace_data::ExecLimits::default()) else { continue };
                let values: Vec<String> = rs
                    .rows
                    .iter()
                    .filter_map(|r| match r.first() {
                        Some(Value::Text(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .collect();
                if values.is_empty() {
                    continue;
                }
                let new = values[pick.next(values.len())].clone();
                let mut q2 = q.clone();
                let s = single_select_mut(&mut q2).expect("a single select");
                let mut k = 0;
                let _ = sqlparser::ast::visit_expressions_mut(
                    s.selection.as_mut().expect("has conditions"),
                    |e: &mut Expr| {
                        if let Expr::Value(v) = e {
                            if v.value == SqlValue::SingleQuotedString(old.clone()) {
                                if k == 0 {
                                    v.value = SqlValue::SingleQuotedString(new.clone());
                                }
                                k += 1;
                            }
                        }
                        ControlFlow::<()>::Continue(())
                    },
                );
                let _ = ci;
                out.push(q2);
            }
        }
        ErrorType::ReversedOrder | ErrorType::OffByOneLimit => out.extend(order_limit(et, q)),
        ErrorType::ArithmeticSlip | ErrorType::Other => {}
    }
    out
}

/// Comparisons with a literal, anywhere in the query (inner queries
/// included), each turned around in one copy.
fn flipped_filters(q: &Query) -> Vec<Query> {
    let mut out = Vec::new();
    for site in 0..8 {
        let mut q2 = q.clone();
        let mut seen = 0;
        let mut changed = false;
        {
            // Anywhere in the query, inner queries included.
            let _ = sqlparser::ast::visit_expressions_mut(&mut q2, |e: &mut Expr| {
                if let Expr::BinaryOp { left, op, right } = e {
                    let literal = matches!(**left, Expr::Value(_)) || matches!(**right, Expr::Value(_));
                    let flipped = match op {
                        BinaryOperator::Gt => Some(BinaryOperator::Lt),
                        BinaryOperator::Lt => Some(BinaryOperator::Gt),
                        BinaryOperator::GtEq => Some(BinaryOperator::LtEq),
                        BinaryOperator::LtEq => Some(BinaryOperator::GtEq),
                        BinaryOperator::Eq => Some(BinaryOperator::NotEq),
                        BinaryOperator::NotEq => Some(BinaryOperator::Eq),
                        _ => None,
                    };
                    if let (true, Some(f)) = (literal, flipped) {
                        if seen == site {
                            *op = f;
                            changed = true;
                            return ControlFlow::Break(());
                        }
                        seen += 1;
                    }
                }
                ControlFlow::Continue(())
            });
        }
        if !changed {
            break;
        }
        out.push(q2);
    }
    out
}

fn order_limit(et: ErrorType, q: &Query) -> Vec<Query> {
    let mut q2 = q.clone();
    match et {
        ErrorType::ReversedOrder => {
            let Some(ob) = q2.order_by.as_mut() else { return vec![] };
            let OrderByKind::Expressions(exprs) = &mut ob.kind else { return vec![] };
            let Some(first) = exprs.first_mut() else { return vec![] };
            first.options.sort = match first.options.sort {
                Some(OrderBySort::Desc) => Some(OrderBySort::Asc),
                _ => Some(OrderBySort::Desc),
            };
            vec![q2]
        }
        ErrorType::OffByOneLimit => {
            let Some(LimitClause::LimitOffset { limit: Some(_), offset, .. }) = q2.limit_clause.as_mut() else {
                return vec![];
            };
            let current = offset.as_ref().and_then(|o| o.value.to_string().parse::<u64>().ok()).unwrap_or(0);
            *offset = Some(Offset {
                value: Expr::value(SqlValue::Number((current + 1).to_string(), false)),
                rows: OffsetRows::None,
            });
            vec![q2]
        }
        _ => vec![],
    }
}

/// Points a column reference at another column of the same table.
fn replace_column(e: &mut Expr, column: &str) {
    match e {
        Expr::Identifier(id) => *id = Ident::new(column),
        Expr::CompoundIdentifier(parts) => {
            if let Some(last) = parts.last_mut() {
                *last = Ident::new(column);
            }
        }
        Expr::Nested(inner) => replace_column(inner, column),
        _ => {}
    }
}

/// A copy of the positive trace with one computed number changed, in the
/// last step that states it and in the final answer.
fn arithmetic_slip(positive: &ProgramTrace, pick: &mut Pick) -> Option<ProgramTrace> {
    let rs = &positive.result;
    let (r, c) = rs.rows.iter().enumerate().find_map(|(r, row)| {
        row.iter().position(|v| matches!(v, Value::Integer(_) | Value::Real(_))).map(|c| (r, c))
    })?;
    let old = rs.rows[r][c].clone();
    let new = match old {
        Value::Integer(i) => Value::Integer(i + [1, -1, 2, 10][pick.next(4)]),
        Value::Real(x) if x.fract() == 0.0 => Value::Real(x + [1.0, -1.0, 2.0, 10.0][pick.next(4)]),
        Value::Real(x) => Value::Real((x * 1.1 * 100.0).round() / 100.0),
        _ => return None,
    };
    let mut result = rs.clone();
    result.rows[r][c] = new.clone();
    let final_answer = answer_line(&result);
    let (old_s, new_s) = (old.to_string(), new.to_string());
    let mut lines: Vec<String> = positive.text.lines().map(str::to_string).collect();
    let last = lines.len().checked_sub(1)?;
    lines[last] = format!("Final answer: {final_answer}");
    if let Some(l) = lines[..last].iter_mut().rev().find(|l| l.contains(&old_s)) {
        *l = l.replacen(&old_s, &new_s, 1);
    }
    Some(ProgramTrace {
        text: lines.join("\n"),
        final_answer,
        result,
        sql: positive.sql.clone(),
        error_type: Some(ErrorType::ArithmeticSlip),
        evidence: positive.evidence.clone(),
    })
}
