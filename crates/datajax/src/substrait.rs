//! Export and import of plans as Substrait, so other engines (DuckDB,
//! Velox, Acero, ...) can run a traced program.
//!
//! A Substrait plan names its inputs as tables: the IR's input names. The
//! exported bytes are the protobuf `substrait.Plan`; importing one needs the
//! same table names bound (`--input NAME=PATH`).

use std::collections::HashMap;

use datafusion::logical_expr::LogicalPlan;
use datafusion_substrait::logical_plan::{consumer, producer};
use datafusion_substrait::substrait::proto::Plan;
use prost::Message;

use crate::engine::{Engine, Source, Table};
use crate::error::{DatajaxError, Result};
use crate::ir::Ir;

/// The Substrait plan of `ir` over `inputs`, as protobuf bytes.
pub fn export(engine: &Engine, ir: &Ir, inputs: &HashMap<String, Source>) -> Result<Vec<u8>> {
    let plan = engine.plan(ir, inputs)?;
    export_plan(engine, &plan)
}

/// The Substrait bytes of a logical plan.
pub fn export_plan(engine: &Engine, plan: &LogicalPlan) -> Result<Vec<u8>> {
    let state = engine.session().state();
    let sub = producer::to_substrait_plan(plan, &state)
        .map_err(|e| DatajaxError::Engine(format!("exporting to Substrait: {e}")))?;
    Ok(sub.encode_to_vec())
}

/// The logical plan of Substrait `bytes`, with its tables bound to `inputs`
/// (`origin` names the bytes in errors).
pub fn import(
    engine: &Engine,
    bytes: &[u8],
    inputs: &HashMap<String, Source>,
    origin: &str,
) -> Result<LogicalPlan> {
    let plan = Plan::decode(bytes).map_err(|e| DatajaxError::Ir {
        origin: origin.to_owned(),
        message: format!("not a Substrait plan: {e}"),
    })?;
    for (name, source) in inputs {
        engine.register(name, source)?;
    }
    let state = engine.session().state();
    engine
        .block_on(consumer::from_substrait_plan(&state, &plan))
        .map_err(|e| DatajaxError::Ir {
            origin: origin.to_owned(),
            message: format!("cannot import this Substrait plan: {e}"),
        })
}

/// Runs Substrait `bytes` on `inputs`.
pub fn run(
    engine: &Engine,
    bytes: &[u8],
    inputs: &HashMap<String, Source>,
    origin: &str,
) -> Result<Table> {
    let plan = import(engine, bytes, inputs, origin)?;
    engine.run_plan(plan)
}
