//! `datafree verify`: a CI gate for any quantized ONNX model (ours or another tool's) against its
//! reference: named checks with thresholds, exit 0 when all hold and 1 when one fails, reported as
//! JSON and JUnit XML.

use serde::Serialize;

use super::compare::Comparison;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    pub student: String,
    pub reference: String,
    pub pass: bool,
    pub checks: Vec<Check>,
    pub comparison: Comparison,
}

/// What the gate requires.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub min_agreement: f64,
    pub max_top1_drop: f64,
    /// Applies to synthesized inputs (without data), when given.
    pub max_logit_error: Option<f64>,
    pub max_sim_diff: Option<f64>,
}

/// Applies the thresholds to a comparison: on labelled data agreement and top-1 drop; on
/// synthesized inputs agreement where the reference is confident, and the logit error.
pub fn checks(c: &Comparison, t: &Thresholds) -> Vec<Check> {
    let (min_agreement, max_top1_drop, max_sim_diff) =
        (t.min_agreement, t.max_top1_drop, t.max_sim_diff);
    let mut v = vec![match &c.confident {
        Some(k) => Check {
            name: "agreement".into(),
            pass: k.images > 0 && k.agreement >= min_agreement,
            detail: format!(
                "student and reference predict the same class on {:.2}% of the {} images the reference classifies with confidence >= {} ({} in all: {}); required {:.2}%",
                100.0 * k.agreement,
                k.images,
                k.threshold,
                c.images,
                c.inputs,
                100.0 * min_agreement
            ),
        },
        None => Check {
            name: "agreement".into(),
            pass: c.agreement >= min_agreement,
            detail: format!(
                "student and reference predict the same class on {:.2}% of {} images ({}); required {:.2}%",
                100.0 * c.agreement,
                c.images,
                c.inputs,
                100.0 * min_agreement
            ),
        },
    }];
    if let (Some(_), Some(max)) = (&c.confident, t.max_logit_error) {
        v.push(Check {
            name: "logit_error".into(),
            pass: c.logit_error <= max,
            detail: format!(
                "mean relative logit error {:.4}; allowed {max:.4}",
                c.logit_error
            ),
        });
    }
    if let (Some(d), Some(s), Some(r)) = (c.top1_drop, c.student_top1, c.reference_top1) {
        v.push(Check {
            name: "top1_drop".into(),
            pass: d <= max_top1_drop,
            detail: format!(
                "top-1 {s:.2}% vs reference {r:.2}%: drop {d:.2} points; allowed {max_top1_drop:.2}"
            ),
        });
    }
    if let Some(tol) = max_sim_diff {
        v.push(match &c.simulation {
            Ok(s) => Check {
                name: "simulation".into(),
                pass: s.max_abs_logit_diff <= tol,
                detail: format!("datafree simulation vs ONNX Runtime: max |logit diff| {:.3e}, top-1 agreement {:.2}%; allowed {tol:.1e}", s.max_abs_logit_diff, 100.0 * s.top1_agreement),
            },
            Err(e) => Check { name: "simulation".into(), pass: false, detail: format!("could not simulate: {e}") },
        });
    }
    v
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JUnit XML: one test case per check.
pub fn junit(r: &GateReport) -> String {
    let failures = r.checks.iter().filter(|c| !c.pass).count();
    let mut s = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"datafree verify {}\" tests=\"{}\" failures=\"{failures}\">\n",
        xml_escape(&r.student),
        r.checks.len()
    );
    for c in &r.checks {
        s.push_str(&format!(
            "    <testcase classname=\"datafree.verify\" name=\"{}\">",
            xml_escape(&c.name)
        ));
        if c.pass {
            s.push_str(&format!(
                "<system-out>{}</system-out>",
                xml_escape(&c.detail)
            ));
        } else {
            s.push_str(&format!("<failure message=\"{}\"/>", xml_escape(&c.detail)));
        }
        s.push_str("</testcase>\n");
    }
    s.push_str("  </testsuite>\n</testsuites>\n");
    s
}
