//! A multi-layer perceptron in JSON: `{"name": "v1", "layers": [{"weights": [[..]..],
//! "bias": [..], "activation": "relu" | "linear"}]}`. Each layer maps its input x to
//! activation(W x + b).

use serde::Deserialize;

#[derive(Deserialize, Debug)]
pub struct Model {
    pub name: String,
    layers: Vec<Layer>,
}

#[derive(Deserialize, Debug)]
struct Layer {
    weights: Vec<Vec<f64>>,
    bias: Vec<f64>,
    #[serde(default)]
    activation: Activation,
}

#[derive(Deserialize, Debug, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Activation {
    #[default]
    Linear,
    Relu,
}

impl Model {
    pub fn load(path: &str) -> Result<Model, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let model: Model = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        model.check()?;
        Ok(model)
    }

    fn check(&self) -> Result<(), String> {
        if self.layers.is_empty() {
            return Err("the model has no layers".into());
        }
        let mut width = self.inputs();
        for (i, l) in self.layers.iter().enumerate() {
            if l.weights.is_empty() || l.weights.len() != l.bias.len() {
                return Err(format!(
                    "layer {i}: {} rows of weights but {} biases",
                    l.weights.len(),
                    l.bias.len()
                ));
            }
            if l.weights.iter().any(|row| row.len() != width) {
                return Err(format!("layer {i}: every row must have {width} weights"));
            }
            width = l.weights.len();
        }
        Ok(())
    }

    /// How many numbers an input has.
    pub fn inputs(&self) -> usize {
        self.layers[0].weights[0].len()
    }

    pub fn predict(&self, input: &[f64]) -> Result<Vec<f64>, String> {
        if input.len() != self.inputs() {
            return Err(format!(
                "the model takes {} inputs, not {}",
                self.inputs(),
                input.len()
            ));
        }
        let mut x = input.to_vec();
        for l in &self.layers {
            x = l
                .weights
                .iter()
                .zip(&l.bias)
                .map(|(row, b)| {
                    let y = row.iter().zip(&x).map(|(w, v)| w * v).sum::<f64>() + b;
                    match l.activation {
                        Activation::Linear => y,
                        Activation::Relu => y.max(0.0),
                    }
                })
                .collect();
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_two_layer_model_predicts_and_checks_shapes() {
        let m: Model = serde_json::from_str(
            r#"{"name":"t","layers":[{"weights":[[1,0],[0,-1]],"bias":[0,0],"activation":"relu"},{"weights":[[2,3]],"bias":[1]}]}"#,
        )
        .unwrap();
        m.check().unwrap();
        // relu([1, -2]) = [1, 0]; 2*1 + 3*0 + 1 = 3
        assert_eq!(m.predict(&[1.0, 2.0]).unwrap(), vec![3.0]);
        assert!(m.predict(&[1.0]).unwrap_err().contains("takes 2 inputs"));
        let bad: Model =
            serde_json::from_str(r#"{"name":"b","layers":[{"weights":[[1,2]],"bias":[0,0]}]}"#)
                .unwrap();
        assert!(bad.check().is_err());
    }
}
