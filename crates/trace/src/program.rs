//! The SQL-grounded program tracer: turns a question's gold SQL into a
//! step-by-step reasoning trace whose every number comes from executing a
//! step of the query on SQLite.
//!
//! Steps, in the order a person would reason: look at the tables, join them
//! on their keys, apply each condition (with the rows left), work out inner
//! queries, group and aggregate, sort and cut, and state the result, ending
//! with one `Final answer: …` line.

use sqlparser::ast::{Expr, OrderByKind, OrderBySort, Query, SetExpr, TableWithJoins};
use tabletrace_data::{Answer, Database, ErrorType, ExecLimits, ResultSet, TableDb, Value};

use crate::sql::{conjuncts, group_by, join_condition, parse_query, single_select, tables_of, Resolver, TableUse};

/// Settings of the program tracer.
#[derive(Debug, Clone)]
pub struct ProgramTracer {
    /// Limits on each step's query.
    pub limits: ExecLimits,
    /// Rows or groups listed in a step at most. Default 5.
    pub max_listed: usize,
    /// Rows of a final answer at most; larger results are not traced. Default 30.
    pub max_answer_rows: usize,
    /// Join and condition steps that leave at most this many rows list them,
    /// with the columns the rest of the query reads (`(singer.Name,
    /// singer.Age) = (Joe, 52); (Ann, 41)`), so that a later count, sum or sort works over rows
    /// written out in the trace rather than over a number it states. Default
    /// 0: those steps state their row count only.
    pub list_rows: usize,
}

impl Default for ProgramTracer {
    fn default() -> Self {
        ProgramTracer {
            limits: ExecLimits { max_rows: 1000, ..ExecLimits::default() },
            max_listed: 5,
            max_answer_rows: 30,
            list_rows: 0,
        }
    }
}

/// A trace made by the program tracer.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramTrace {
    /// The trace text, ending with the final-answer line.
    pub text: String,
    /// The answer stated on the final line.
    pub final_answer: String,
    /// The query's result.
    pub result: ResultSet,
    /// The SQL traced (the gold SQL, or a perturbed copy for negatives).
    pub sql: String,
    /// The error a negative trace contains.
    pub error_type: Option<ErrorType>,
    /// Values that occurred in the executed intermediate results, for
    /// faithfulness scoring.
    pub evidence: Vec<String>,
}

/// Writes an answer as the final line states it: values of a row joined by
/// ", ", rows by "; ", `none` for an empty result.
pub fn answer_line(rs: &ResultSet) -> String {
    if rs.rows.is_empty() {
        return "none".to_string();
    }
    Answer::Table(rs.clone()).to_line()
}

/// Results of step queries already run for one question, shared by its
/// positive and negative traces (which repeat most steps).
#[derive(Debug, Default)]
pub struct StepCache(std::cell::RefCell<std::collections::HashMap<String, ResultSet>>);

struct Ctx<'a> {
    db: &'a TableDb,
    cache: &'a StepCache,
    schema: &'a Database,
    tracer: &'a ProgramTracer,
    steps: Vec<String>,
    evidence: Vec<String>,
    depth: usize,
}

impl Ctx<'_> {
    fn run(&mut self, sql: &str) -> Result<ResultSet, String> {
        let cached = self.cache.0.borrow().get(sql).cloned();
        let rs = match cached {
            Some(rs) => rs,
            None => {
                let rs = self
                    .db
                    .query(sql, &self.tracer.limits)
                    .map_err(|f| format!("step `{sql}` failed: {}", f.message))?;
                self.cache.0.borrow_mut().insert(sql.to_string(), rs.clone());
                rs
            }
        };
        // Row counts are computed facts too ("2 groups").
        self.evidence.push(rs.n_rows.to_string());
        for row in rs.rows.iter().take(50) {
            self.evidence.extend(row.iter().map(Value::to_string));
        }
        Ok(rs)
    }

    fn count(&mut self, from_where: &str) -> Result<usize, String> {
        let rs = self.run(&format!("SELECT COUNT(*) FROM {from_where}"))?;
        let n = rs.rows.first().and_then(|r| r.first()).and_then(Value::as_f64).unwrap_or(0.0) as usize;
        self.evidence.push(n.to_string());
        Ok(n)
    }

    fn step(&mut self, text: String) {
        self.steps.push(text);
    }

    /// `": (singer.Name, singer.Age) = (Joe, 52); (…)"`: the `n` rows of `from_where`
    /// (whose tables are `handles`) with those of `columns` that belong to
    /// them, when `list_rows` is set and `n` is within it; else nothing (also
    /// when the listing query fails: the step keeps its count). Rows come in
    /// the tables' own order (that of `handles`, by rowid), as the prompt
    /// shows them, so that each step lists them in the same order.
    fn rows_of(&mut self, columns: &[Listed], handles: &[&str], from_where: &str, n: usize) -> String {
        let select: Vec<String> = columns
            .iter()
            .filter(|c| handles.contains(&c.handle.as_str()))
            .map(|c| format!("{} AS {}", c.sql, quote(&c.label)))
            .collect();
        if n == 0 || n > self.tracer.list_rows || select.is_empty() {
            return String::new();
        }
        let plain = format!("SELECT {} FROM {from_where}", select.join(", "));
        let order: Vec<String> = handles.iter().map(|h| format!("{}.rowid", quote(h))).collect();
        let ordered = format!("{plain} ORDER BY {} LIMIT {n}", order.join(", "));
        match self.run(&ordered).or_else(|_| self.run(&format!("{plain} LIMIT {n}"))) {
            Ok(rs) => format!(": {}", columns_then_rows(&rs)),
            Err(_) => String::new(),
        }
    }
}

/// `(a.x, b.y) = (1, u); (2, v)`, or `a.x = 1; 2` for one column: the
/// column names once, then each row's values.
fn columns_then_rows(rs: &ResultSet) -> String {
    let one = rs.columns.len() == 1;
    let wrap = |parts: Vec<String>| if one { parts.join(", ") } else { format!("({})", parts.join(", ")) };
    let names = wrap(rs.columns.iter().map(|c| c.trim_matches('"').to_string()).collect());
    let rows: Vec<String> = rs.rows.iter().map(|r| wrap(r.iter().map(Value::to_string).collect())).collect();
    format!("{names} = {}", rows.join("; "))
}

/// A column that join and condition steps list: how the SQL reaches it, the
/// FROM-clause handle it belongs to, and how the trace names it.
struct Listed {
    sql: String,
    handle: String,
    label: String,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The columns the query reads outside its join conditions — projection,
/// conditions, grouping, HAVING, ordering — each once, in that order. An
/// identifier no table of the FROM clause has (an inner query's own) is left
/// out. A query that reads none (`COUNT(*)` over a join) lists its first
/// table's first text column (else its first column), so its rows can be
/// counted.
fn read_columns(sel: &sqlparser::ast::Select, q: &Query, uses: &[TableUse], schema: &Database) -> Vec<Listed> {
    let mut exprs: Vec<&Expr> = Vec::new();
    for item in &sel.projection {
        if let sqlparser::ast::SelectItem::UnnamedExpr(e) | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } =
            item
        {
            exprs.push(e);
        }
    }
    exprs.extend(sel.selection.iter());
    exprs.extend(group_by(sel));
    exprs.extend(sel.having.iter());
    if let Some(ob) = &q.order_by {
        if let OrderByKind::Expressions(os) = &ob.kind {
            exprs.extend(os.iter().map(|o| &o.expr));
        }
    }
    let mut out: Vec<Listed> = Vec::new();
    let add = |out: &mut Vec<Listed>, u: &TableUse, column: &str| {
        let Some(table) = schema.table(&u.name) else { return };
        let Some(i) = table.column_index(column) else { return };
        let label = format!("{}.{}", table.name, table.columns[i].name);
        if !out.iter().any(|l| l.label == label && l.handle == u.handle()) {
            out.push(Listed {
                sql: format!("{}.{}", quote(u.handle()), quote(&table.columns[i].name)),
                handle: u.handle().to_string(),
                label,
            });
        }
    };
    for e in exprs {
        let _ = sqlparser::ast::visit_expressions(e, |x: &Expr| {
            match x {
                Expr::Identifier(id) => {
                    let owner = uses
                        .iter()
                        .find(|u| schema.table(&u.name).is_some_and(|t| t.column_index(&id.value).is_some()));
                    if let Some(u) = owner {
                        add(&mut out, u, &id.value);
                    }
                }
                Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                    if let Some(u) = uses.iter().find(|u| u.handle().eq_ignore_ascii_case(&parts[0].value)) {
                        add(&mut out, u, &parts[1].value);
                    }
                }
                _ => {}
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
    }
    if out.is_empty() {
        if let Some(u) = uses.first() {
            if let Some(t) = schema.table(&u.name) {
                let text = t.columns.iter().find(|c| c.ty == tabletrace_data::ColumnType::Text);
                if let Some(c) = text.or(t.columns.first()) {
                    add(&mut out, u, &c.name);
                }
            }
        }
    }
    out
}

impl ProgramTracer {
    /// Traces `sql` on a question's tables.
    pub fn trace(&self, db: &TableDb, sql: &str, cache: &StepCache) -> Result<ProgramTrace, String> {
        let schema = db.schema().map_err(|f| f.message)?;
        let query = parse_query(sql)?;
        self.trace_query(db, &schema, &query, None, cache)
    }

    pub(crate) fn trace_query(
        &self,
        db: &TableDb,
        schema: &Database,
        query: &Query,
        error_type: Option<ErrorType>,
        cache: &StepCache,
    ) -> Result<ProgramTrace, String> {
        let mut ctx = Ctx { db, cache, schema, tracer: self, steps: Vec::new(), evidence: Vec::new(), depth: 0 };
        let sql = query.to_string();
        let result = trace_query(&mut ctx, query)?;
        if result.n_rows > self.max_answer_rows {
            return Err(format!(
                "the result has {} rows, more than the {} a trace lists",
                result.n_rows, self.max_answer_rows
            ));
        }
        let final_answer = answer_line(&result);
        let mut text = String::new();
        for (i, s) in ctx.steps.iter().enumerate() {
            text.push_str(&format!("Step {}: {s}\n", i + 1));
        }
        text.push_str(&format!("Final answer: {final_answer}"));
        Ok(ProgramTrace { text, final_answer, result, sql, error_type, evidence: ctx.evidence })
    }
}

fn list_rows(rs: &ResultSet, max: usize) -> String {
    let mut parts: Vec<String> = rs
        .rows
        .iter()
        .take(max)
        .map(|row| {
            let cells: Vec<String> =
                rs.columns.iter().zip(row).map(|(c, v)| format!("{} = {v}", c.trim_matches('"'))).collect();
            format!("({})", cells.join(", "))
        })
        .collect();
    if rs.n_rows > max {
        parts.push(format!("and {} more", rs.n_rows - max));
    }
    parts.join("; ")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn is_aggregate(e: &Expr) -> bool {
    match e {
        Expr::Function(f) => {
            let name = f.name.to_string().to_ascii_lowercase();
            matches!(name.as_str(), "sum" | "avg" | "count" | "min" | "max" | "total" | "group_concat")
        }
        _ => false,
    }
}

/// Aggregate calls anywhere inside `e`.
fn aggregates_in(e: &Expr, out: &mut Vec<Expr>) {
    let _ = sqlparser::ast::visit_expressions(e, |x: &Expr| {
        if is_aggregate(x) && !out.contains(x) {
            out.push(x.clone());
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
}

fn has_subquery(e: &Expr) -> Option<Query> {
    let mut found = None;
    let _ = sqlparser::ast::visit_expressions(e, |x: &Expr| {
        let q = match x {
            Expr::InSubquery { subquery, .. } => Some(subquery.as_ref().clone()),
            Expr::Subquery(q) => Some(q.as_ref().clone()),
            Expr::Exists { subquery, .. } => Some(subquery.as_ref().clone()),
            _ => None,
        };
        if let Some(q) = q {
            found = Some(q);
            return std::ops::ControlFlow::Break(());
        }
        std::ops::ControlFlow::Continue(())
    });
    found
}

fn trace_query(ctx: &mut Ctx, q: &Query) -> Result<ResultSet, String> {
    if let Some(sel) = single_select(q) {
        return trace_select(ctx, sel, q);
    }
    if let SetExpr::SetOperation { left, op, set_quantifier, right } = q.body.as_ref() {
        let side =
            |body: &SetExpr| Query { body: Box::new(body.clone()), order_by: None, limit_clause: None, ..q.clone() };
        ctx.step("Answer the two parts of the question separately.".into());
        let l = trace_query(ctx, &side(left))?;
        ctx.step(format!("The first part gives {}.", describe_result(&l, ctx.tracer.max_listed)));
        let r = trace_query(ctx, &side(right))?;
        ctx.step(format!("The second part gives {}.", describe_result(&r, ctx.tracer.max_listed)));
        let all = ctx.run(&q.to_string())?;
        let how = match op {
            sqlparser::ast::SetOperator::Union => "Put both lists together",
            sqlparser::ast::SetOperator::Intersect => "Keep what appears in both lists",
            sqlparser::ast::SetOperator::Except => "Keep what the first list has and the second lacks",
            _ => "Combine the two lists",
        };
        let dup = if set_quantifier.to_string().contains("ALL") { "" } else { ", without duplicates" };
        ctx.step(format!("{how}{dup}: {}.", describe_result(&all, ctx.tracer.max_listed)));
        return Ok(all);
    }
    // Anything else (VALUES, CTEs): state the result.
    ctx.run(&q.to_string())
}

fn describe_result(rs: &ResultSet, max: usize) -> String {
    match rs.n_rows {
        0 => "no rows".to_string(),
        n => format!("{}: {}", plural(n, "row", "rows"), list_rows(rs, max)),
    }
}

fn trace_select(ctx: &mut Ctx, sel: &sqlparser::ast::Select, q: &Query) -> Result<ResultSet, String> {
    let uses = tables_of(&sel.from);
    let resolver = Resolver::new(ctx.schema, &uses);
    let from_sql = sel.from.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let max = ctx.tracer.max_listed;

    // 1. The tables.
    {
        let mut seen = Vec::new();
        let mut parts = Vec::new();
        for u in &uses {
            if seen.contains(&u.name.to_lowercase()) {
                continue;
            }
            seen.push(u.name.to_lowercase());
            let n = ctx.count(&u.name)?;
            parts.push(format!("{} ({})", u.name, plural(n, "row", "rows")));
        }
        if !parts.is_empty() {
            let list = match parts.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
                _ => parts.join(""),
            };
            ctx.step(format!("Look at the table{} {list}.", if parts.len() > 1 { "s" } else { "" }));
        }
    }

    // 2. The joins, one at a time.
    let columns = if ctx.tracer.list_rows > 0 { read_columns(sel, q, &uses, ctx.schema) } else { Vec::new() };
    for twj in &sel.from {
        for i in 0..twj.joins.len() {
            let partial = TableWithJoins { relation: twj.relation.clone(), joins: twj.joins[..=i].to_vec() };
            let n = ctx.count(&partial.to_string())?;
            let so_far = tables_of(std::slice::from_ref(&partial));
            let handles: Vec<&str> = so_far.iter().map(TableUse::handle).collect();
            let rows = ctx.rows_of(&columns, &handles, &partial.to_string(), n);
            let name = so_far.last().map_or("the next table".to_string(), |u| u.name.clone());
            match join_condition(&twj.joins[i]) {
                Some(cond) => ctx.step(format!(
                    "Match {name} to the rows so far where {}: {} match{rows}.",
                    resolver.readable(&cond.to_string()),
                    plural(n, "row", "rows")
                )),
                None => ctx.step(format!("Combine with {name}: {}{rows}.", plural(n, "row", "rows"))),
            }
        }
    }
    if sel.from.len() > 1 {
        let n = ctx.count(&from_sql)?;
        ctx.step(format!("Pair up the rows of these tables: {}.", plural(n, "combination", "combinations")));
    }

    // 3. The conditions, with inner queries worked out first.
    let conds: Vec<&Expr> = sel.selection.as_ref().map(conjuncts).unwrap_or_default();
    let mut applied: Vec<String> = Vec::new();
    let mut remaining = None;
    let all_handles: Vec<&str> = uses.iter().map(TableUse::handle).collect();
    for c in &conds {
        if let Some(inner) = has_subquery(c) {
            if ctx.depth < 2 {
                if let Ok(rs) = ctx.db.query(&inner.to_string(), &ctx.tracer.limits) {
                    ctx.depth += 1;
                    ctx.step("First work out the inner question.".into());
                    let rs2 = trace_query(ctx, &inner).unwrap_or(rs);
                    ctx.depth -= 1;
                    ctx.step(format!("The inner question gives {}.", describe_result(&rs2, max)));
                }
            }
        }
        applied.push(format!("({c})"));
        let from_where = format!("{from_sql} WHERE {}", applied.join(" AND "));
        let n = ctx.count(&from_where)?;
        let rows = ctx.rows_of(&columns, &all_handles, &from_where, n);
        // An inner query is named by its result, not by its SQL.
        let mut cond = c.to_string();
        if let Some(inner) = has_subquery(c) {
            cond = cond.replace(&format!("({inner})"), "(the inner result)");
        }
        ctx.step(format!("Keep the rows where {}: {} left{rows}.", resolver.readable(&cond), plural(n, "row", "rows")));
        remaining = Some(n);
    }
    let where_sql = if applied.is_empty() { String::new() } else { format!(" WHERE {}", applied.join(" AND ")) };

    // 4. Grouping and aggregates.
    let groups = group_by(sel);
    let mut aggs = Vec::new();
    for item in &sel.projection {
        if let sqlparser::ast::SelectItem::UnnamedExpr(e) | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } =
            item
        {
            aggregates_in(e, &mut aggs);
        }
    }
    if let Some(h) = &sel.having {
        aggregates_in(h, &mut aggs);
    }
    if let Some(ob) = &q.order_by {
        if let OrderByKind::Expressions(exprs) = &ob.kind {
            for o in exprs {
                aggregates_in(&o.expr, &mut aggs);
            }
        }
    }
    let rows_left = match remaining {
        Some(n) => n,
        None => ctx.count(&from_sql)?,
    };
    if !groups.is_empty() {
        let g_sql: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let mut cols = g_sql.clone();
        cols.extend(aggs.iter().map(ToString::to_string));
        let having = sel.having.as_ref().map(|h| format!(" HAVING {h}")).unwrap_or_default();
        let all_groups =
            ctx.run(&format!("SELECT {} FROM {from_sql}{where_sql} GROUP BY {}", cols.join(", "), g_sql.join(", ")))?;
        let readable_g: Vec<String> = g_sql.iter().map(|g| resolver.readable(g)).collect();
        let mut text = format!(
            "Group the {} by {}: {}",
            plural(rows_left, "row", "rows"),
            readable_g.join(", "),
            plural(all_groups.n_rows, "group", "groups")
        );
        if !aggs.is_empty() && all_groups.n_rows > 0 {
            let listed = relabel(&all_groups, &resolver);
            text.push_str(&format!(", with {}", list_rows(&listed, max)));
        }
        ctx.step(text + ".");
        if let Some(h) = &sel.having {
            let kept = ctx.run(&format!(
                "SELECT {} FROM {from_sql}{where_sql} GROUP BY {}{having}",
                cols.join(", "),
                g_sql.join(", ")
            ))?;
            ctx.step(format!(
                "Keep the groups where {}: {}.",
                resolver.readable(&h.to_string()),
                describe_result(&relabel(&kept, &resolver), max)
            ));
        }
    } else if !aggs.is_empty() {
        let names: Vec<String> = aggs.iter().map(|a| resolver.readable(&a.to_string())).collect();
        ctx.step(format!("Compute {} over the {}.", names.join(" and "), plural(rows_left, "row", "rows")));
    } else if rows_left > 0 && rows_left <= max && !conds.is_empty() && q.order_by.is_none() {
        // Plain selection: the rows left are the answer; nothing more to do.
    }
    if sel.distinct.is_some() {
        ctx.step("Remove duplicate values.".into());
    }

    // 5. Ordering and cutting.
    if let Some(ob) = &q.order_by {
        if let OrderByKind::Expressions(exprs) = &ob.kind {
            let keys: Vec<String> = exprs
                .iter()
                .map(|o| {
                    let dir = match o.options.sort {
                        Some(OrderBySort::Desc) => "from highest to lowest",
                        _ => "from lowest to highest",
                    };
                    format!("{} {dir}", resolver.readable(&o.expr.to_string()))
                })
                .collect();
            let cut = limit_text(q);
            ctx.step(format!("Sort by {}{cut}.", keys.join(", then ")));
        }
    } else if q.limit_clause.is_some() {
        ctx.step(format!("Keep{}.", limit_text(q)));
    }

    // 6. The result.
    let result = ctx.run(&q.to_string())?;
    let what = match &sel.projection[..] {
        [one] => resolver.readable(&one.to_string()),
        items => items.iter().map(|i| resolver.readable(&i.to_string())).collect::<Vec<_>>().join(", "),
    };
    let answer = if result.n_rows == 0 { "nothing".to_string() } else { answer_line(&result) };
    if ctx.depth == 0 {
        ctx.step(format!("Report {what}: {answer}."));
    }
    Ok(result)
}

/// Column labels of a step's result with aliases replaced by table names.
fn relabel(rs: &ResultSet, resolver: &Resolver) -> ResultSet {
    ResultSet { columns: rs.columns.iter().map(|c| resolver.readable(c)).collect(), ..rs.clone() }
}

fn limit_text(q: &Query) -> String {
    use sqlparser::ast::LimitClause;
    match &q.limit_clause {
        Some(LimitClause::LimitOffset { limit: Some(l), offset, .. }) => {
            let n = l.to_string();
            match offset {
                Some(o) => format!(" and take {n} after skipping the first {}", o.value),
                None if n == "1" => " and take the first one".to_string(),
                None => format!(" and take the first {n}"),
            }
        }
        Some(LimitClause::OffsetCommaLimit { offset, limit }) => {
            format!(" and take {limit} after skipping the first {offset}")
        }
        _ => String::new(),
    }
}
