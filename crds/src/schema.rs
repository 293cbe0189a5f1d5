//! Schema pieces that derive attributes cannot express: cross-field rules built from
//! `required`, `not`, `anyOf` and `oneOf`, in the forms a Kubernetes structural schema allows.
//!
//! A structural schema (CRD `apiextensions.k8s.io/v1`) allows logical junctors (`allOf`,
//! `anyOf`, `oneOf`, `not`) only as value validations: inside them no `type`, `description`,
//! `default`, `nullable` or `additionalProperties`, and no property that the enclosing schema
//! does not declare itself. Kubernetes 1.20 has no CEL rules (`x-kubernetes-validations`), so
//! "if `mode` is `Dedicated` then `cidr` or `interface`" is written as
//! `not: {properties: {mode: {enum: [Dedicated]}}, not: {oneOf: [{required: [cidr]}, ...]}}`.
//!
//! kube's structural rewriter hoists the `properties` of `anyOf`/`oneOf` branches into the
//! parent (that is how it turns Rust enums into structural schemas), so a branch that
//! constrains a property's value must sit under `not` or `allOf`, which it leaves alone;
//! branches directly under `anyOf`/`oneOf` here only ever hold `required`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use schemars::Schema;
use serde_json::{Value, json};

/// `{required: [field]}`: holds when `field` is present.
pub(crate) fn has(field: &str) -> Value {
    json!({ "required": [field] })
}

/// Holds when the string property `field` is present and equal to `value`. Wrapped in `allOf`
/// so that kube's rewriter does not hoist its `properties` when it sits in an `anyOf` branch.
pub(crate) fn equals(field: &str, value: &str) -> Value {
    json!({ "allOf": [{ "required": [field], "properties": { field: { "enum": [value] } } }] })
}

/// Adds `rule` to the schema's `allOf` (creating it).
pub(crate) fn add_rule(schema: &mut Schema, rule: Value) {
    let all_of = schema.ensure_object().entry("allOf").or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(rules) = all_of {
        rules.push(rule);
    }
}

/// At least one of `fields` must be present.
pub(crate) fn require_any(schema: &mut Schema, fields: &[&str]) {
    add_rule(schema, json!({ "anyOf": fields.iter().map(|f| has(f)).collect::<Vec<_>>() }));
}

/// When `condition` holds, `then` must hold too: `anyOf: [then, {not: condition}]`.
///
/// `then` comes first because of how the API server (go-openapi) reports a failed `anyOf`:
/// with the errors of the branch that matched best, the first one on a tie. A `not` branch
/// reports nothing beyond "must not validate", so the errors shown are `then`'s, which say
/// what is missing ("spec.replicationLink.cidr: Required value", or "mode: Unsupported
/// value: \"Cluster\": supported values: \"Dedicated\"").
pub(crate) fn when(schema: &mut Schema, condition: Value, then: Value) {
    add_rule(schema, json!({ "anyOf": [then, { "not": condition }] }));
}

/// Marks a list nullable. Every optional list in this API is: Kubernetes 1.20's server-side
/// apply stores a list that an apply empties or stops setting as null (instead of removing
/// it), which a non-nullable schema refuses; the Rust types read null as empty.
pub(crate) fn nullable_list(schema: &mut Schema) {
    schema.ensure_object().insert("nullable".into(), json!(true));
}

/// A nullable list keyed by `key` (`x-kubernetes-list-type: map`): the API server refuses two
/// items with the same key, and server-side apply merges items by key, so that several
/// writers can own items of one list.
pub(crate) fn keyed_list(schema: &mut Schema, key: &str) {
    nullable_list(schema);
    let obj = schema.ensure_object();
    obj.insert("x-kubernetes-list-type".into(), json!("map"));
    obj.insert("x-kubernetes-list-map-keys".into(), json!([key]));
}

/// A nullable list keyed by `name`.
pub(crate) fn list_by_name(schema: &mut Schema) {
    keyed_list(schema, "name");
}

/// A nullable list keyed by `node`.
pub(crate) fn list_by_node(schema: &mut Schema) {
    keyed_list(schema, "node");
}

/// A nullable list of conditions, keyed by `type`.
pub(crate) fn list_by_type(schema: &mut Schema) {
    keyed_list(schema, "type");
}

/// A nullable list of unique scalars (`x-kubernetes-list-type: set`).
pub(crate) fn set_list(schema: &mut Schema) {
    nullable_list(schema);
    schema.ensure_object().insert("x-kubernetes-list-type".into(), json!("set"));
}

/// Joins the lines of every description in a CRD's schemas: doc comments are wrapped at the
/// source's width, `kubectl explain` wraps at the terminal's. Paragraph breaks stay.
pub(crate) fn unwrap_descriptions(crd: &mut CustomResourceDefinition) {
    for version in &mut crd.spec.versions {
        if let Some(props) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            visit(props, &mut |p| {
                if let Some(d) = p.description.as_mut() {
                    *d = unwrap(d);
                }
            });
        }
    }
}

fn unwrap(text: &str) -> String {
    text.split("\n\n")
        .map(|para| para.split('\n').map(str::trim).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Calls `f` on `props` and every schema nested in it.
fn visit(props: &mut JSONSchemaProps, f: &mut impl FnMut(&mut JSONSchemaProps)) {
    f(props);
    for p in props.properties.iter_mut().flat_map(|m| m.values_mut()) {
        visit(p, f);
    }
    match props.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(p)) => visit(p, f),
        Some(JSONSchemaPropsOrArray::Schemas(ps)) => ps.iter_mut().for_each(|p| visit(p, f)),
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(p)) = props.additional_properties.as_mut() {
        visit(p, f);
    }
    for p in [&mut props.all_of, &mut props.any_of, &mut props.one_of].into_iter().flatten().flatten() {
        visit(p, f);
    }
    if let Some(p) = props.not.as_mut() {
        visit(p, f);
    }
}
